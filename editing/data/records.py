"""The records every reader produces and every editor consumes.

`EditRequest` is one fact to write into the model; `Benchmark` is a named list of them plus the
evaluation style the file follows; `EvalCase` is what evaluation runs for one request: every prompt
of every kind, each with the target that is teacher-forced and, where the style compares two answers,
the contrasting one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

Style = Literal["counterfact", "zsre"]
STYLES: tuple[str, ...] = get_args(Style)

# Evaluation prompt kinds, in report order.
PromptKind = Literal["rewrite", "paraphrase", "neighborhood", "locality"]
KINDS: tuple[str, ...] = get_args(PromptKind)

# The two benchmarks built from ParaRel (`editing.data.pararel`), also the shipped sets.
Kind = Literal["counterfactual", "factual"]


class DataError(ValueError):
    """Bad input: names the file, the record index and the field."""

    def __init__(self, message: str, *, file: str | None = None, record: int | None = None,
                 field: str | None = None):
        where = []
        if file is not None:
            where.append(f"file {file!r}")
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field {field!r}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.file, self.record, self.field = file, record, field


@dataclass
class EditRequest:
    """One edit: make `prompt.format(subject)` continue with `target_new`.

    `prompt` is a template holding exactly one ``{}`` where the subject goes. Targets are stored
    without a leading space; tokenisation adds the separator (see `editing.tokens`).
    """

    case_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    locality_prompt: str | None = None
    locality_answer: str | None = None
    generation_prompts: list[str] = field(default_factory=list)
    relation_id: str | None = None
    # Multi-hop questions about the edited fact (MQuAKE / EasyEdit portability): after the edit, each
    # prompt should be answered with its answer (which follows from the new fact).
    portability_prompts: list[str] = field(default_factory=list)
    portability_answers: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The edit prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)

    def validate(self, *, file: str | None = None, record: int | None = None) -> "EditRequest":
        def fail(msg: str, fld: str) -> None:
            raise DataError(msg, file=file, record=record, field=fld)

        if not isinstance(self.subject, str) or not self.subject.strip():
            fail("the subject is empty", "subject")
        if not isinstance(self.prompt, str) or self.prompt.count("{}") != 1:
            fail(f"the prompt must hold exactly one '{{}}' for the subject, got {self.prompt!r}", "prompt")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            fail("the new target is empty", "target_new")
        if self.target_true is not None and (not isinstance(self.target_true, str) or not self.target_true.strip()):
            fail("the true target is empty", "target_true")
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            fail(f"target_new equals target_true ({self.target_new!r}): the edit would change nothing", "target_new")
        if self.text.strip() == "":
            fail("the prompt is empty", "prompt")
        for name in ("locality_prompt", "locality_answer", "relation_id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                fail(f"expected a string, got {type(value).__name__}", name)
        if not isinstance(self.case_id, str):
            fail(f"expected a string, got {type(self.case_id).__name__}", "case_id")
        if (self.locality_prompt is None) != (self.locality_answer is None):
            fail("a locality prompt needs a locality answer and the reverse", "locality_answer")
        if self.locality_answer is not None and not self.locality_answer.strip():
            fail("the locality answer is empty", "locality_answer")
        for name in ("paraphrase_prompts", "neighborhood_prompts", "generation_prompts", "portability_prompts",
                     "portability_answers"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(p, str) and p.strip() for p in value):
                fail("must be a list of non-empty strings", name)
        if len(self.portability_prompts) != len(self.portability_answers):
            fail(f"{len(self.portability_prompts)} portability prompts but {len(self.portability_answers)} answers",
                 "portability_answers")
        return self

    def with_suffix(self, suffix: str) -> "EditRequest":
        """A copy whose edit, paraphrase, neighbourhood and locality prompts end with `suffix` (e.g.
        iReVa's zsRE trigger " Answer:"); generation prompts are left alone."""
        if not suffix:
            return self
        return replace(self, prompt=self.prompt + suffix,
                       paraphrase_prompts=[p + suffix for p in self.paraphrase_prompts],
                       neighborhood_prompts=[p + suffix for p in self.neighborhood_prompts],
                       locality_prompt=None if self.locality_prompt is None else self.locality_prompt + suffix,
                       portability_prompts=[p + suffix for p in self.portability_prompts])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EditRequest":
        return cls(**d)


@dataclass
class EvalPrompt:
    """One prompt to score. `target` is teacher-forced; `contrast` (if any) is compared with it."""

    kind: str
    prompt: str
    target: str
    contrast: str | None = None


@dataclass
class EvalCase:
    """Everything evaluation runs for one edit request."""

    index: int
    request: EditRequest
    prompts: list[EvalPrompt]

    @classmethod
    def from_request(cls, request: EditRequest, index: int) -> "EvalCase":
        r = request
        prompts = [EvalPrompt("rewrite", r.text, r.target_new, r.target_true)]
        prompts += [EvalPrompt("paraphrase", p, r.target_new, r.target_true) for p in r.paraphrase_prompts]
        if r.target_true is not None:
            # Neighbourhood prompts share the relation and the *true* object: they should keep it.
            prompts += [EvalPrompt("neighborhood", p, r.target_true, r.target_new)
                        for p in r.neighborhood_prompts]
        if r.locality_prompt is not None:
            prompts.append(EvalPrompt("locality", r.locality_prompt, r.locality_answer))
        prompts += [EvalPrompt("portability", p, a) for p, a in zip(r.portability_prompts, r.portability_answers)]
        return cls(index=index, request=r, prompts=prompts)


@dataclass
class Benchmark:
    """A list of requests read from one source, with the evaluation style it follows."""

    name: str
    style: Style
    requests: list[EditRequest]
    source: str | None = None

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"unknown benchmark style {self.style!r}; expected one of {STYLES}")

    def __len__(self) -> int:
        return len(self.requests)
