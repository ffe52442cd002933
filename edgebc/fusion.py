"""Mammogram + ultrasound fusion on the device: a case's mammogram embedded once, each frame fused.

A fusion model is exported as one graph per branch and one for the fusion head
(edgebc.fusion_graphs). `FusionClassifier.attach(case, mammograms)` takes a case's stored
mammogram views once: each through the mammography gate and its input's preprocessing from the
card (full depth, breast crop, laterality by its view), then its branch (a multi-view branch once
for all the case's views, the absent ones marked so), and keeps the embeddings for the case.
Each ultrasound frame then costs the ultrasound gate, the ultrasound branch and the small head,
fed the kept embeddings. With no mammogram attached, or none that
passed its gate, the head is told so through its presence input and answers from ultrasound
alone, as the model was trained to; every decision names the inputs and modalities it used, and
the one decision rule (edgebc.decision) decides it at the card's threshold or a site's.

A case is one woman's: her mammograms and her ultrasound are separate DICOM studies in an archive
(each its own StudyInstanceUID), so the woman is known by her PatientID, compared as a hash kept in
memory only, never recorded. A case's films are one mammography study of one patient: films of
several patients, or of several studies (this year's CC with last year's MLO is not one exam),
are refused together, never fused. Its ultrasound is one ultrasound study of the same patient: a
frame of another patient is never fused with the films, and the ultrasound of several studies is
not one case (`one_ultrasound_study`). A file that is not DICOM carries no study and no patient,
and the context says so.

The fused decision is not checked for distribution shift (the check covers one-input models).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgebc.backends import Backend, open_backend
from edgebc.breast import BreastRefusal
from edgebc.classifier import Decision
from edgebc.decision import DecisionRule
from edgebc.decode import DicomStudy, ImageView
from edgebc.demo import is_demo_card
from edgebc.errors import EdgebcError
from edgebc.fusion_graphs import HEAD, FusionLayout, embedding_name, is_fusion, view_presence_name
from edgebc.integrity import MANIFEST_NAME, read_manifest
from edgebc.metrics import softmax
from edgebc.model_card import ModelInput
from edgebc.preprocess import preprocess_chw, to_channels, validated_image
from edgebc.quality import MammographyGate, QualityGate, QualityResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mammogram:
    """One stored mammogram view: pixels at full depth, what is known of its view (a stated one,
    else its DICOM header's), where it came from, what its header alone says of the view (None:
    the same as `view`) and its study, hashed."""

    image: np.ndarray
    view: ImageView = field(default_factory=ImageView)
    source: str = ""
    header: ImageView | None = None
    study: DicomStudy = field(default_factory=DicomStudy)


@dataclass(frozen=True)
class MammogramUse:
    """What became of one mammogram given for a case: the input it fed (None when it fed none),
    its gate's verdict (or why it was left out), the sha256 of its pixels (never the pixels), the
    view the model read it as (`view`; for one left out, the view it was given), what its own
    header says of it (`header_view`; None: nothing, as for a PNG) and its DICOM study's hash
    (None: not known)."""

    source: str
    input: str | None
    quality: QualityResult
    pixels_sha256: str
    view: str | None = None
    header_view: str | None = None
    study_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "input": self.input, "pixels_sha256": self.pixels_sha256,
                "quality": "ok" if self.quality.ok else "no decision", "reason": self.quality.reason,
                "view": self.view, "header_view": self.header_view, "study_sha256": self.study_sha256}  # fmt: skip


@dataclass(frozen=True)
class MammogramContext:
    """A case's mammograms as the device keeps them: one embedding per branch fed, and the card
    inputs that fed them (`fed`; by default the branches' names, one input each)."""

    case: str
    embeddings: Mapping[str, np.ndarray]  # branch name -> (width,) float32
    mammograms: tuple[MammogramUse, ...]
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    fed: tuple[str, ...] | None = None
    study_sha256: str | None = None  # the films' one DICOM study, hashed; None: none known
    # the films' one patient (PatientID), hashed: compared with the ultrasound's in memory, never
    # written to a record or an answer (a PatientID is guessable from its hash); None: none known
    patient_sha256: str | None = field(default=None, repr=False)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The card inputs the kept embeddings rest on."""
        return tuple(self.embeddings) if self.fed is None else self.fed

    @property
    def views(self) -> tuple[str | None, ...]:
        """The views the model read the films it used as, in the order given."""
        return tuple(use.view for use in self.mammograms if use.input)

    def study_note(self) -> str:
        """What is known of the films' study, for the record: its hash, which films carry none
        (not DICOM, or no StudyInstanceUID: their study is unknown), and whether the ultrasound
        is checked against the films' patient (never the patient's hash)."""
        unknown = [use.source for use in self.mammograms if use.study_sha256 is None]
        if not self.mammograms:
            return "no mammograms"
        note = f"mammography DICOM study {self.study_sha256}"
        if unknown:
            known = "" if self.study_sha256 is None else f"{note}; "
            note = (f"{known}study unknown for {', '.join(unknown)} (not DICOM, or no "
                    "StudyInstanceUID): not checked against the other films' study")  # fmt: skip
        if self.patient_sha256 is None:
            return f"{note}; no film names its patient (PatientID): the ultrasound is not checked against one"  # fmt: skip
        return f"{note}; a DICOM ultrasound frame of another patient (PatientID) is never fused"


@dataclass(frozen=True)
class FusionDecision:
    """A decision and the inputs it rests on: `inputs` the card inputs fed (present in the head's
    mask), `modalities` theirs (`us`, `mg`); empty when there is no decision."""

    decision: Decision
    case: str | None
    inputs: tuple[str, ...]
    modalities: tuple[str, ...]
    mammograms: tuple[MammogramUse, ...] = ()
    graphs_sha256: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**self.decision.to_json(), "case": self.case, "inputs_used": list(self.inputs),
                "modalities": list(self.modalities),
                "mammograms": [m.to_json() for m in self.mammograms],
                "graphs_sha256": dict(self.graphs_sha256)}  # fmt: skip


def pixels_sha256(image: np.ndarray) -> str:
    """A mammogram's identity for the record: its dtype, shape and pixels hashed."""
    digest = hashlib.sha256(f"{image.dtype.str}{image.shape}".encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def stated_view(stated: ImageView, header: ImageView, name: str) -> ImageView:
    """The view a mammogram is read with when one is stated for it (an operator's attach, a
    `--mammogram VIEW=PATH`): the stated side and position with the header's chest-wall edge; a
    header that says another side or position is refused (ValueError naming both), never
    overridden, so a right MLO cannot feed a left CC input."""
    for what, given, known in (("side", stated.laterality, header.laterality),
                               ("view position", stated.position, header.position)):  # fmt: skip
        if given is not None and known is not None and given != known:
            raise ValueError(
                f"{name}: the view {view_code(stated) or given} was given but its DICOM header "
                f"says {what} {known}"
            )
    return ImageView.hung(stated.laterality or "L", stated.position, header)


def view_code(view: ImageView) -> str | None:
    """`L-CC` from a view whose side and position are known, else None."""
    if view.laterality is None or view.position is None:
        return None
    return f"{view.laterality}-{view.position}"


def view_text(view: ImageView | None) -> str | None:
    """What a view says, for the record: `L-CC`, or only `L` or `MLO` where only that is known."""
    if view is None:
        return None
    return view_code(view) or view.laterality or view.position


def one_study(mammograms: Sequence[Mammogram]) -> DicomStudy:
    """The one DICOM study and patient (hashed) a case's films belong to, None where none says.
    Films of several patients, or of several studies of one patient (this year's CC and last
    year's MLO: two exams, which the model never saw fused as one), are refused together
    (ValueError naming each file and which of them agree), never fused as one case."""
    named = [(m.source or f"mammogram {k + 1}", m.study) for k, m in enumerate(mammograms)]
    patient = _one_of(named, "patient_sha256", "the case's mammograms are films of several "
                      "patients", "PatientID", "never fused; attach one patient's films")  # fmt: skip
    study = _one_of(named, "study_sha256", "the case's mammograms are films of several studies",
                    "StudyInstanceUID", "a case's films are one mammography study (a prior "
                    "exam's films are not fused with this one's); attach one study's films")  # fmt: skip
    return DicomStudy(study, patient)


def one_ultrasound_study(named: Sequence[tuple[str, DicomStudy]]) -> str | None:
    """The one DICOM study (hashed) of a case's ultrasound images, None where none says; the
    ultrasound of several patients or several studies is refused (ValueError naming each file
    and which of them agree): a case is one ultrasound study, as the live cart ends a case at a
    new one."""
    _one_of(named, "patient_sha256", "the case's ultrasound is of several patients", "PatientID",
            "never fused as one case")  # fmt: skip
    return _one_of(named, "study_sha256", "the case's ultrasound is of several DICOM studies",
                   "StudyInstanceUID", "a case is one ultrasound study; classify each study as "
                   "its own case")  # fmt: skip


def another_patient(films: str | None, frame: DicomStudy | None) -> bool:
    """Whether an ultrasound frame is known to be of another patient than the films' (`films`,
    their PatientID's hash): both must name one, compared in memory, never recorded."""
    return films is not None and frame is not None and frame.patient_sha256 not in (None, films)


def _one_of(named: Sequence[tuple[str, DicomStudy]], key: str, what: str, tag: str,
            rule: str) -> str | None:  # fmt: skip
    """The one value of `key` (a DicomStudy hash) the named files share, None where none says;
    more than one: ValueError naming the files by group (A, B, ...), never the values."""
    groups: dict[str, list[str]] = {}
    for name, study in named:
        value = getattr(study, key)
        if value is not None:
            groups.setdefault(value, []).append(name)
    if len(groups) > 1:
        listed = "; ".join(f"{chr(65 + n)}: {', '.join(files)}"
                           for n, files in enumerate(groups.values()))  # fmt: skip
        raise ValueError(f"{what} ({len(groups)} different {tag}s; {listed}): {rule}")
    return next(iter(groups), None)


def open_fusion_graphs(
    path: str | Path,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int = 0,
    spin_wait: bool = True,
) -> dict[str, Backend]:
    """Every graph of the exported fusion model that `path` (any of its graphs) belongs to, by
    graph name, each verified against MANIFEST.sha256; graphs of different exports are refused.
    As for a single model, the file named chooses the runtime: a `.onnx` graph opens the ONNX
    siblings on ONNX Runtime (`providers`), a TensorRT `.engine` (from `edgebc export
    --tensorrt`) the engine siblings its sidecar names, all found before CUDA is touched."""
    path = Path(path)
    if path.suffix.lower() == ".engine":
        from edgebc.backends.tensorrt.sidecar import engine_siblings

        engine_siblings(path)  # every engine there, of the same export, or a plain refusal
    first = open_backend(path, providers, threads, spin_wait=spin_wait)
    layout: FusionLayout | None = getattr(first, "fusion", None)
    if layout is None:
        first.close()
        raise EdgebcError(
            f"{path}: not a graph of an exported fusion model (its card has "
            f"{len(first.card.inputs)} input(s) and no fusion layout); export a fusion checkpoint "
            "with `edgebc export`"
        )
    listed = read_manifest(path.parent) if (path.parent / MANIFEST_NAME).exists() else None
    unlisted = [f for f in layout.files.values() if listed is not None and f not in listed]
    if unlisted:
        first.close()
        raise EdgebcError(
            f"{path}: {', '.join(sorted(unlisted))} not listed in {MANIFEST_NAME} beside it: "
            "a file the last export there did not write (an earlier export's, left behind); "
            "export again into an empty folder, or name a graph the manifest lists"
        )
    graphs: dict[str, Backend] = {}
    for graph, file in layout.files.items():
        sibling = path.parent / file
        backend = first if graph == layout.graph else open_backend(sibling, providers, threads,
                                                                    spin_wait=spin_wait)  # fmt: skip
        other: FusionLayout | None = getattr(backend, "fusion", None)
        same = (
            other is not None
            and other.for_graph(graph) == layout.for_graph(graph)
            and backend.card.weights_sha256 == first.card.weights_sha256
            and backend.card.exported == first.card.exported
        )
        if not same:
            raise EdgebcError(
                f"{sibling}: is not the {graph} graph of the same export as {path} (another "
                "export's file, or renamed); copy the export folder whole"
            )
        graphs[graph] = backend
    return graphs


class FusionClassifier:
    """A fusion model's graphs with the gates around them: `attach(case, mammograms)` once per
    case, then `classify(frame)` per ultrasound frame."""

    def __init__(
        self,
        graphs: Mapping[str, Backend],
        gate: QualityGate | None = None,
        mammography_gate: MammographyGate | None = None,
        threshold: float | None = None,
    ) -> None:
        head = graphs[HEAD]
        layout: FusionLayout | None = getattr(head, "fusion", None)
        if layout is None or not is_fusion(head.card):
            raise EdgebcError(f"model {head.card.name} is not an exported fusion model")
        self.graphs, self.layout, self.card = dict(graphs), layout, head.card
        self.rule = DecisionRule.of(self.card, threshold)
        self.threshold = self.rule.threshold
        self.gate = gate or QualityGate()
        self.mammography_gate = mammography_gate or MammographyGate()
        self.demo = is_demo_card(self.card.lineage)
        frame_inputs = [i for i in self.card.inputs if i.changes == "frame"]
        if len(frame_inputs) != 1 or frame_inputs[0].modality != "us":
            raise EdgebcError(
                f"model {self.card.name}: the device fuses one ultrasound input per frame with "
                f"mammograms per case; its per-frame inputs are "
                f"{[(i.name, i.modality) for i in frame_inputs]}"
            )
        self.ultrasound: ModelInput = frame_inputs[0]
        self.ultrasound_branch = layout.branch_of(self.ultrasound.name)
        if layout.branches[self.ultrasound_branch] != (self.ultrasound.name,):
            raise EdgebcError(
                f"model {self.card.name}: its ultrasound input {self.ultrasound.name} shares the "
                f"branch {self.ultrasound_branch} with other inputs; the device runs it alone per frame"
            )
        self.mammography = [i for i in self.card.inputs if i.modality == "mg"]
        if len(self.mammography) + 1 != len(self.card.inputs):
            raise EdgebcError(
                f"model {self.card.name}: every input but the ultrasound one must be a mammogram"
            )
        self.graphs_sha256 = {g: b.model_sha256 for g, b in self.graphs.items()}
        self.context: MammogramContext | None = None

    @classmethod
    def open(
        cls,
        path: str | Path,
        gate: QualityGate | None = None,
        mammography_gate: MammographyGate | None = None,
        threshold: float | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int = 0,
        spin_wait: bool = True,
    ) -> FusionClassifier:
        graphs = open_fusion_graphs(path, providers, threads, spin_wait)
        return cls(graphs, gate, mammography_gate, threshold)

    def fresh(self) -> FusionClassifier:
        """A classifier on the same graphs, gates and threshold with no case attached: for work
        beside this one's case (a new case embedded while the live stream runs, an upload that
        is not the live patient) without touching it."""
        return FusionClassifier(self.graphs, self.gate, self.mammography_gate, self.threshold)

    # -- the case's mammograms: once per case ---------------------------------------------------
    def attach(self, case: str, mammograms: Sequence[Mammogram]) -> MammogramContext:
        """Gate, preprocess and embed a case's mammograms (each branch runs once) and keep them
        for the frames that follow; replaces what was attached before. Films of different
        studies or patients: ValueError, and nothing changes."""
        films = one_study(mammograms)
        clock = time.perf_counter
        start = clock()
        uses: list[MammogramUse] = []
        tensors: dict[str, np.ndarray] = {}
        for mammogram in mammograms:
            image = validated_image(mammogram.image)
            digest = pixels_sha256(image)
            model_input, view, refusal = self._input_for(mammogram, tensors, uses)
            header = view_text(mammogram.view if mammogram.header is None else mammogram.header)
            used = view_text(view)
            facts = MammogramUse(mammogram.source, None, refusal, digest, used, header,
                                 mammogram.study.study_sha256)  # fmt: skip
            if model_input is None:
                uses.append(facts)
                continue
            grey = to_channels(image, 1)
            verdict = self.mammography_gate.check(image, grey)
            if verdict.ok:
                try:
                    tensors[model_input.name] = preprocess_chw(
                        grey if model_input.preprocess.channels == 1 else image,
                        model_input.preprocess, view=view,
                    )  # fmt: skip
                except BreastRefusal as exc:
                    verdict = QualityResult(False, str(exc), exc.check)
            uses.append(
                replace(facts, input=model_input.name if verdict.ok else None, quality=verdict)
            )
        prepared = clock()
        embeddings = {}
        for branch, names in self.layout.branches.items():
            if branch != self.ultrasound_branch and any(n in tensors for n in names):
                feeds = self._branch_feeds(branch, tensors)
                embeddings[branch] = self.graphs[branch].run_named(feeds)[embedding_name(branch)][0]
        done = clock()
        timings = {"mammogram_preprocess": (prepared - start) * 1e3,
                   "mammogram_branch": (done - prepared) * 1e3}  # fmt: skip
        fed = tuple(i.name for i in self.mammography if i.name in tensors)
        self.context = MammogramContext(
            case, embeddings, tuple(uses), timings, fed, films.study_sha256, films.patient_sha256
        )
        log.info("case %s: mammograms attached for %s (%d given)", case,
                 ", ".join(fed) or "none", len(mammograms))  # fmt: skip
        return self.context

    def _branch_feeds(
        self, branch: str, tensors: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """A branch graph's feeds for one case: its input's tensor, or every view's (an absent one
        zeros) and the views' presence."""
        names = self.layout.branches[branch]
        if len(names) == 1:
            return {names[0]: tensors[names[0]][np.newaxis]}
        shapes = {i.name: i.shape for i in self.card.inputs}
        feeds = {n: (tensors[n] if n in tensors else np.zeros(shapes[n], np.float32))[np.newaxis]
                 for n in names}  # fmt: skip
        feeds[view_presence_name(branch)] = np.array([[n in tensors for n in names]], np.float32)
        return feeds

    def detach(self) -> None:
        """The case ended: the next frames are fused with no mammogram."""
        self.context = None

    def _input_for(
        self, mammogram: Mammogram, taken: Mapping[str, np.ndarray], uses: Sequence[MammogramUse]
    ) -> tuple[ModelInput | None, ImageView, QualityResult]:
        """The mammography input this mammogram feeds and the view it is read with: a known view
        (side and projection) feeds the input of that view, or one without a view; an unknown one
        feeds the model's only mammography input, read as that input's view where it names one
        (the side or the view position a header gives must agree). Otherwise None and why."""
        code = view_code(mammogram.view)
        fed = set(taken) | {u.input for u in uses if u.input}
        views = ", ".join(str(i.view) for i in self.mammography)

        def refused(reason: str) -> tuple[None, ImageView, QualityResult]:
            return None, mammogram.view, QualityResult(False, reason, "view")

        if code is None and len(self.mammography) > 1:
            return refused(f"its view is not known (no DICOM header says it); the model takes "
                           f"the views {views}")  # fmt: skip
        exact = [i for i in self.mammography if code is not None and i.view == code]
        matching = exact or [i for i in self.mammography if i.view is None or code is None]
        if not matching:
            return refused(f"its view {code} is none of the model's ({views})")
        free = [i for i in matching if i.name not in fed]
        if not free:
            return refused(f"a second mammogram for input {matching[0].name}: a case takes one "
                           "image per view")  # fmt: skip
        chosen, view = free[0], mammogram.view
        sides = {ImageView.from_code(i.view).laterality for i in self.mammography
                 if i.name in fed and i.view}  # fmt: skip
        side_of_chosen = ImageView.from_code(chosen.view).laterality if chosen.view else None
        if side_of_chosen is not None and sides and side_of_chosen not in sides:
            # a case is one breast: training never fused the two breasts' films, nor may the device
            return refused(f"a case is one breast: its side {side_of_chosen} is not the side "
                           f"({', '.join(sorted(str(x) for x in sides))}) of the case's other "
                           "mammograms")  # fmt: skip
        if code is None and chosen.view:
            stated = ImageView.from_code(chosen.view)
            side, position = mammogram.view.laterality, mammogram.view.position
            if side is not None and side != stated.laterality:
                return refused(
                    f"its side {side} (its DICOM header) is not the model's {chosen.view}"
                )
            if position is not None and position != stated.position:
                return refused(
                    f"its view position {position} (its DICOM header) is not the model's "
                    f"{chosen.view}"
                )
            view = ImageView.hung(stated.laterality or "L", stated.position, mammogram.view)
        return chosen, view, QualityResult(True)

    # -- ultrasound frames: every frame ----------------------------------------------------------
    def classify(self, frame: np.ndarray) -> FusionDecision:
        return self.classify_batch([frame])[0]

    def classify_batch(self, frames: Sequence[np.ndarray]) -> list[FusionDecision]:
        """Each frame through the ultrasound gate, branch and head, with the attached mammograms'
        embeddings (or none); frames failing the gate get no decision and are not run."""
        clock = time.perf_counter
        start = clock()
        images = [validated_image(f) for f in frames]
        greys = [to_channels(f, 1) for f in images]
        verdicts = [self.gate.check(f, g) for f, g in zip(images, greys, strict=True)]
        gated = clock()
        prep = self.ultrasound.preprocess
        passing = [k for k, v in enumerate(verdicts) if v.ok]
        tensors = [preprocess_chw(greys[k] if prep.channels == 1 else images[k], prep)
                   for k in passing]  # fmt: skip
        preprocessed = clock()
        name, branch_name = self.ultrasound.name, self.ultrasound_branch
        embedded: list[np.ndarray] = []
        for chunk in range(0, len(tensors), self.card.max_batch):
            batch = np.stack(tensors[chunk : chunk + self.card.max_batch])
            out = self.graphs[branch_name].run_named({name: batch})
            embedded.append(out[embedding_name(branch_name)])
        branch = clock()
        probs = self._fused(np.concatenate(embedded)) if embedded else np.empty((0, 0))
        fused = clock()
        used = (name, *(self.context.inputs if self.context else ()))
        modalities = self._modalities(used)
        decisions = []
        row = {k: r for r, k in enumerate(passing)}
        for k, verdict in enumerate(verdicts):
            if not verdict.ok:
                decided = self._decision(None, verdict)
                decisions.append(self._result(decided, (), ()))
                continue
            decisions.append(self._result(self._decision(probs[row[k]], verdict), used, modalities))
        done = clock()
        per_frame = 1000.0 / max(1, len(frames))
        timings = {"quality": (gated - start) * per_frame,
                   "preprocess": (preprocessed - gated) * per_frame,
                   "ultrasound_branch": (branch - preprocessed) * per_frame,
                   "head": (fused - branch) * per_frame, "postprocess": (done - fused) * per_frame}  # fmt: skip
        return [
            replace(d, decision=replace(d.decision, timings_ms=dict(timings))) for d in decisions
        ]

    def classify_mammograms(self) -> FusionDecision:
        """The case from its attached mammograms alone, for a model whose ultrasound input is
        optional (no frame at hand); refused plainly where the card requires ultrasound."""
        if not self.ultrasound.optional:
            raise EdgebcError(
                f"model {self.card.name} requires its ultrasound input {self.ultrasound.name}; "
                "it does not answer from mammograms alone"
            )
        context = self.context
        if context is None or not context.embeddings:
            refused = QualityResult(False, "no mammogram of the case passed its gate", "case")
            return self._result(self._decision(None, refused), (), ())
        probs = self._fused(None)
        return self._result(self._decision(probs[0], QualityResult(True)), context.inputs,
                            self._modalities(context.inputs))  # fmt: skip

    def case_decision(self, frames: Sequence[FusionDecision]) -> FusionDecision:
        """The case from its frames' decisions: the mean of the decided frames' probabilities,
        decided by the rule, over the inputs any of them used; no decision without one."""
        decided = [f for f in frames if f.decision.probabilities is not None]
        if not decided:
            refused = QualityResult(
                False, "no ultrasound frame of the case passed its gate", "case"
            )
            return self._result(self._decision(None, refused), (), ())
        mean = np.mean([list(f.decision.probabilities.values()) for f in decided], axis=0)  # type: ignore[union-attr]
        inputs = tuple(dict.fromkeys(n for f in decided for n in f.inputs))
        return self._result(self._decision(mean, QualityResult(True)), inputs,
                            self._modalities(inputs))  # fmt: skip

    def _fused(self, ultrasound: np.ndarray | None) -> np.ndarray:
        """Calibrated probabilities of the head for a batch of ultrasound embeddings (None: one
        row without ultrasound), with the attached mammograms' embeddings or their absence."""
        rows = 1 if ultrasound is None else len(ultrasound)
        kept = self.context.embeddings if self.context else {}
        feeds: dict[str, np.ndarray] = {}
        present = np.zeros((rows, len(self.layout.order)), np.float32)
        for column, name in enumerate(self.layout.order):
            if name == self.ultrasound_branch and ultrasound is not None:
                feeds[embedding_name(name)] = ultrasound.astype(np.float32, copy=False)
            elif name in kept:
                feeds[embedding_name(name)] = np.tile(kept[name], (rows, 1))
            else:  # absent: zeros, marked 0 (the head ignores it)
                feeds[embedding_name(name)] = np.zeros((rows, self.layout.width), np.float32)
                continue
            present[:, column] = 1.0
        feeds[self.layout.presence] = present
        outputs: list[np.ndarray] = []
        for chunk in range(0, rows, self.card.max_batch):
            part = {k: v[chunk : chunk + self.card.max_batch] for k, v in feeds.items()}
            outputs.append(self.graphs[HEAD].run_named(part)[self.card.output_name])
        return softmax(np.concatenate(outputs), self.card.temperature)

    def _modalities(self, inputs: Sequence[str]) -> tuple[str, ...]:
        of = {i.name: i.modality for i in self.card.inputs}
        return tuple(dict.fromkeys(of[n] for n in inputs))

    def _decision(self, p: np.ndarray | None, quality: QualityResult) -> Decision:
        sha = self.graphs_sha256[HEAD]
        runtime = self.graphs[HEAD].name  # the head's; the branches run on the same runtime
        if p is None:
            return Decision(None, None, None, self.threshold, quality, sha, demo=self.demo,
                            runtime=runtime)  # fmt: skip
        named = dict(zip(self.card.class_names, map(float, p), strict=True))
        return Decision(self.rule.decide(p), named, float(p[self.rule.positive]), self.threshold,
                        quality, sha, demo=self.demo, runtime=runtime)  # fmt: skip

    def _result(self, decision: Decision, inputs: Sequence[str],
                modalities: Sequence[str]) -> FusionDecision:  # fmt: skip
        context = self.context
        return FusionDecision(decision, context.case if context else None, tuple(inputs),
                              tuple(modalities), context.mammograms if context else (),
                              self.graphs_sha256)  # fmt: skip

    def close(self) -> None:
        for backend in self.graphs.values():
            backend.close()
