"""Datasets, torch-free: reading and checking rows (:mod:`.rows`), rendering and tokenising
them with loss masks (:mod:`.encoding`), and the submit-time analysis with the base
model's tokenizer (:mod:`.check`, imported on its own).
"""

from ..errors import TemplateError
from .encoding import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_INPUT,
    IGNORE_INDEX,
    TRAINED_KEY,
    Encoded,
    Prompt,
    Rendered,
    Tokens,
    encode,
    encode_many,
    first_label,
    is_trained,
    labels_for,
    prompts_of,
    render,
    render_many,
    tokenize_many,
)
from .pairs import PREFERENCE_FORMATS
from .rows import (
    CATEGORIES,
    CHAT_ROLES,
    DEFAULT_LIMITS,
    FORMAT_KEYS,
    MAX_LISTED_PROBLEMS,
    MESSAGE_KEYS,
    SUFFIXES,
    Dataset,
    ProblemList,
    ReadLimits,
    RowProblem,
    check_dataset,
    check_split,
    detect_file_format,
    detect_format,
    file_kind,
    load_dataset,
    read_records,
    row_problem,
    sha256_bytes,
    split_indices,
    where_in,
)

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_INPUT", "CATEGORIES", "CHAT_ROLES", "DEFAULT_LIMITS", "FORMAT_KEYS", "IGNORE_INDEX",
    "MAX_LISTED_PROBLEMS", "MESSAGE_KEYS", "PREFERENCE_FORMATS", "SUFFIXES", "TRAINED_KEY", "Dataset", "Encoded", "ProblemList", "Prompt",
    "ReadLimits",
    "Rendered", "RowProblem", "TemplateError", "Tokens", "check_dataset", "check_split", "detect_file_format",
    "detect_format", "encode", "encode_many", "file_kind", "first_label", "is_trained", "labels_for",
    "load_dataset", "prompts_of", "read_records", "render", "render_many", "row_problem", "sha256_bytes", "split_indices",
    "tokenize_many", "where_in",
]
