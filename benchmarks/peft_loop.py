"""Many LoRA adapters in one process, by hand: the limit loraq is measured against.

    python benchmarks/peft_loop.py --base MODEL --jobs JOBS.json [settings as peft_script.py]

``JOBS.json`` is a list of ``{"data": ..., "out": ..., "seed": ...}``. One interpreter,
one import of torch/transformers/peft, the base loaded once; each adapter is
:func:`peft_script.train_adapter` (a fresh LoRA with HF Trainer, saved, unloaded).
No queue, no checks, no crash safety.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from peft_script import load_base, settings_parser, train_adapter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(parents=[settings_parser()], description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--jobs", required=True)
    args = parser.parse_args(argv)
    with open(args.jobs, encoding="utf-8") as fh:
        jobs = json.load(fh)
    start = time.perf_counter()
    base, tokenizer = load_base(args.base)
    results = [train_adapter(base, tokenizer, job["data"], job["out"], job["seed"], args) for job in jobs]
    print(json.dumps({"results": results, "seconds_in_process": round(time.perf_counter() - start, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
