"""Records, readers, the ParaRel builder and the EditDataModule."""
from typing import Any

from editing.data.records import Benchmark, DataError, EditRequest, EvalCase, EvalPrompt
from editing.data.readers import load_benchmark, read_counterfact, read_hf, read_jsonl, read_zsre, write_jsonl
from editing.data.module import EditDataModule
from editing.data.samples import TokenPair, out_of_scope_samples, per_token_pairs

__all__ = ["Benchmark", "DataError", "EditRequest", "EvalCase", "EvalPrompt", "load_benchmark", "read_counterfact",
           "read_hf", "read_jsonl", "read_zsre", "write_jsonl", "build_pararel", "EditDataModule", "TokenPair",
           "out_of_scope_samples", "per_token_pairs"]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `python -m editing.data.pararel` (the builder's command line) does not
    # find its module already loaded by the package (runpy warns then). There is no import cycle.
    if name == "build_pararel":
        from editing.data.pararel import build_pararel
        return build_pararel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
