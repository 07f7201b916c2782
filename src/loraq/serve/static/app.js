// loraq serve: live updates over server-sent events. The server renders every
// fragment (escaped there); this file only swaps them in, and appends log text as
// text nodes. No inline script anywhere: the Content-Security-Policy forbids it.
"use strict";

(function () {
  const body = document.body;
  const live = document.getElementById("live");

  // An action form returns to the page it was sent from.
  document.addEventListener("submit", function (event) {
    const next = event.target.querySelector("input[name=next]");
    if (next) next.value = location.pathname + location.search;
  });

  function fragment(html) {
    const t = document.createElement("template");
    t.innerHTML = html.trim();
    return t.content;
  }

  function swapSections(sections) {
    for (const [id, html] of Object.entries(sections || {})) {
      const el = document.getElementById(id);
      if (!el) continue;
      el.replaceChildren(fragment(html));
    }
    markCurrentCount();
  }

  function markCurrentCount() {
    const counts = document.getElementById("counts");
    if (!counts) return;
    for (const a of counts.querySelectorAll("a.count")) {
      a.classList.toggle("current", a.dataset.status === counts.dataset.current);
    }
  }

  // ---------------------------------------------------------------- the queue page
  const table = document.getElementById("jobs");
  let unseen = 0;

  // The server sends this page only the rows it shows, and new jobs it has room for (it knows the
  // page's filter and number from the stream's address); jobs of the filter it does not list come as a count.
  function onQueueChange(data) {
    const tbody = table.tBodies[0];
    for (const row of data.rows) {
      const old = tbody.querySelector('tr[data-id="' + row.id + '"]');
      if (old) {
        if (Number(old.dataset.seq) >= row.seq) continue;  // an older copy of what is shown
        old.replaceWith(fragment(row.html));
      } else {
        tbody.appendChild(fragment(row.html));
      }
    }
    unseen += data.unseen || 0;  // jobs of this page's filter that it does not list: the server counts them
    swapSections(data.sections);
    const notice = document.getElementById("notice");
    if (notice && unseen) {
      notice.firstElementChild.textContent = unseen + " job(s) changed that this page does not list";
      notice.hidden = false;
    }
  }

  // ---------------------------------------------------------------- the job page
  const log = document.getElementById("log");
  if (log) log.scrollTop = log.scrollHeight;  // a followed log opens at its end

  function onJobChange(data) {
    swapSections(data.sections);
  }

  function onLog(data) {
    if (!log) return;
    if (data.reset || log.dataset.empty) { log.textContent = ""; delete log.dataset.empty; }
    if (!data.text) return;
    const stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.appendChild(document.createTextNode(data.text));
    if (stick) log.scrollTop = log.scrollHeight;
  }

  // ---------------------------------------------------------------- the stream
  markCurrentCount();
  const url = body.dataset.stream;
  if (!url || typeof EventSource === "undefined") return;
  const source = new EventSource(url);
  source.addEventListener("open", function () { live.classList.add("on"); live.classList.remove("off"); });
  source.addEventListener("error", function () { live.classList.add("off"); live.classList.remove("on"); });
  source.addEventListener("queue", function (e) { if (table) onQueueChange(JSON.parse(e.data)); });
  source.addEventListener("job", function (e) { onJobChange(JSON.parse(e.data)); });
  source.addEventListener("log", function (e) { onLog(JSON.parse(e.data)); });
  source.addEventListener("reload", function () { location.reload(); });
})();
