"""qat: fine-tune the quantized model of a chosen plan (quantization-aware training).

The model trains through the same fake quantizers as PTQ (straight-through gradients). Activation
ranges are learned from their calibrated values (LSQ for symmetric schemes, LSQ+ with an integer
zero point for asymmetric ones); weight ranges follow the weights (their max, per channel, at every
step). BatchNorm is folded into the convolutions when the model is prepared in eval mode (as PTQ
does), so the trained model exports as folded convolutions; BatchNorm left unfolded is frozen.

The default loss distils the FP32 model: KL divergence on logits (classifiers), cosine distance on
unit-norm embeddings, MSE otherwise; plus cross-entropy when the batches carry class labels. A
``step_fn(student, teacher, batch) -> loss`` replaces it. The learning rate follows a cosine decay
over all steps. Recipe defaults (``QATConfig.from_original``): 10% of the original schedule at 1% of
its learning rate (see the README section "QAT" for the sources).

Each epoch ends with a weights-only checkpoint (``ckpt.pt``, loaded with ``torch.load(weights_only=True)``,
written atomically) fingerprinted to the plan, the calibrated model, the training data and the
config; a run killed at any point resumes from the last finished epoch and ends where an
uninterrupted run ends.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mixq.artifacts import write_atomic
from mixq.errors import CheckpointError, ConfigError, MixqError, StaleCheckpointError
from mixq.fingerprint import Hasher, parameters_digest
from mixq.quant.modules import QuantMixin
from mixq.quantize import _state, call_model

EPOCH_FRACTION = 0.1  # of the original schedule
LR_FRACTION = 0.01  # of the original learning rate
LOSSES = ("auto", "kl", "cosine", "mse")
CKPT, MODEL, META = "ckpt.pt", "model.pt", "qat.json"
_CKPT_FORMAT, _FILE_FORMAT, _FILE_VERSION = "mixq-qat-checkpoint", "mixq-qat", 1


@dataclass(frozen=True)
class QATConfig:
    """How to fine-tune.

    Attributes:
        epochs: passes over the training batches (> 0).
        lr: peak learning rate of AdamW (cosine decay to 0 over all steps).
        weight_decay: AdamW weight decay of the model weights (learned ranges get none).
        loss: "auto" (KL for classifiers, cosine for unit-norm embeddings), "kl", "cosine" or "mse".
        temperature: distillation temperature (KL).
        task_weight: weight of the cross-entropy on labels, when batches carry them (0 = distillation only).
        learn_ranges: learn activation ranges (else they stay calibrated).
        seed: batch order and dropout of each epoch derive from it (resumed runs repeat them).
    """

    epochs: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    loss: str = "auto"
    temperature: float = 1.0
    task_weight: float = 1.0
    learn_ranges: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs <= 0:
            raise ConfigError(f"epochs must be a whole number > 0, but got {self.epochs!r}.")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite number > 0, but got {self.lr!r}.")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, but got {self.weight_decay!r}.")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; valid losses are {', '.join(LOSSES)}.")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, but got {self.temperature!r}.")
        if not self.task_weight >= 0:
            raise ConfigError(f"task_weight must be >= 0, but got {self.task_weight!r}.")

    @classmethod
    def from_original(cls, epochs: int, lr: float, **changes: Any) -> "QATConfig":
        """The field recipe: 10% of the original epochs (at least 1) at 1% of the original learning rate."""
        return cls(**{"epochs": max(1, round(EPOCH_FRACTION * epochs)), "lr": LR_FRACTION * lr, **changes})

    @classmethod
    def from_recipe(cls, recipe: dict, **changes: Any) -> "QATConfig":
        """The field recipe on a task's ``TRAIN_RECIPE`` (``epochs``, ``lr``), unless it states a measured ``qat_lr``.

        A recipe whose 1% learning rate was measured to do nothing (MiniLM: its 2e-7) states the one used
        instead as ``qat_lr``, with the measurement in a comment beside it.

        Raises:
            ConfigError: the recipe lacks ``epochs`` or ``lr``.
        """
        if not {"epochs", "lr"} <= set(recipe):
            raise ConfigError(f"a training recipe needs 'epochs' and 'lr', but got the keys {sorted(recipe)}.")
        base = cls.from_original(recipe["epochs"], recipe["lr"])
        return cls(**{"epochs": base.epochs, "lr": recipe.get("qat_lr", base.lr), **changes})


@dataclass
class QATResult:
    """What a ``qat`` call did: one record per epoch (``epoch``, ``loss``, ``metric`` when evaluated)."""

    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0


# --------------------------------------------------------------------------- losses
def _first(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise MixqError(f"the model returned {type(out).__name__}; the default QAT loss needs a tensor (or a tuple / dict "
                    "whose first entry is one): pass step_fn= to compute the loss yourself.")


def output_loss_kind(teacher_out: torch.Tensor) -> str:
    """"cosine" for unit-norm rows (embeddings), "kl" for other 2-D outputs (logits), else "mse"."""
    if teacher_out.dim() != 2:
        return "mse"
    norms = teacher_out.detach().float().norm(dim=1)
    return "cosine" if torch.allclose(norms, torch.ones_like(norms), atol=1e-3) else "kl"


def _labels(targets: Any, logits: torch.Tensor) -> Optional[torch.Tensor]:
    """Class labels for cross-entropy when ``targets`` are one integer per row of ``logits``, else None."""
    if isinstance(targets, torch.Tensor) and not targets.is_floating_point() and targets.dim() == 1 \
            and targets.shape[0] == logits.shape[0] and logits.dim() == 2 and targets.numel() \
            and 0 <= int(targets.min()) and int(targets.max()) < logits.shape[1]:
        return targets
    return None


def distillation_loss(student_out: Any, teacher_out: Any, targets: Any = None, kind: str = "auto",
                      temperature: float = 1.0, task_weight: float = 1.0) -> torch.Tensor:
    """The default QAT loss: distil the FP32 outputs, plus cross-entropy on class labels when there are some.

    Args:
        student_out / teacher_out: outputs of the quantized and the FP32 model (a tensor, or the first
            entry of a tuple / dict).
        targets: the batch's targets, or None. Integer class labels add ``task_weight * cross_entropy``
            (classifiers only).
        kind: "auto", "kl" (logits: KL(teacher || student) at ``temperature``, times T^2), "cosine"
            (1 - cosine similarity of the rows), "mse".
    """
    s, t = _first(student_out), _first(teacher_out).detach()
    kind = output_loss_kind(t) if kind == "auto" else kind
    if kind == "kl":
        tt = temperature
        loss = F.kl_div(F.log_softmax(s.float() / tt, dim=-1), F.log_softmax(t.float() / tt, dim=-1),
                        reduction="batchmean", log_target=True) * tt * tt
        labels = _labels(targets, s) if task_weight > 0 else None
        if labels is not None:
            loss = loss + task_weight * F.cross_entropy(s.float(), labels)
        return loss
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s.float().flatten(1), t.float().flatten(1), dim=1)).mean()
    return F.mse_loss(s.float(), t.float())


def _split_batch(batch: Any) -> tuple[Any, Any]:
    """(inputs, targets) of a training batch: a pair (inputs, targets), or inputs alone (targets None)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


# --------------------------------------------------------------------------- setup
def prepare_qat(qmodel: nn.Module, learn_ranges: bool = True) -> None:
    """Make a calibrated model trainable: learned activation ranges, weight ranges that follow the weights.

    Raises:
        MixqError: the model was not prepared by mixq; ConfigError: it is not calibrated.
    """
    st = _state(qmodel)
    if not st.calibrated or st.plan is None:
        raise ConfigError("QAT starts from a calibrated model with a plan: mixq.quantize(model, plan, calib_data=...).")
    tied: dict[tuple, Any] = {}
    for m in qmodel.modules():
        if not isinstance(m, QuantMixin):
            continue
        for fmt, qs in m.quantizers.items():
            for key, q in qs.items():
                if not (key.startswith("input") or key == "output"):
                    q.track_max = True
                elif learn_ranges and q.is_calibrated and not q.learned and q.desc.block_size is None:
                    _learn_tied(q, fmt, tied)


def _learn_tied(q, fmt: str, tied: dict) -> None:
    """Learn ``q``'s range, sharing the parameters of quantizers calibrated to the very same grid.

    Quantizers in a row on one tensor (a unit's output quantizer and the next unit's input quantizer)
    calibrate to identical ranges, and the exporter writes one Q/DQ for them. Learning them apart
    would put a second Q/DQ (a requantization) in the deployed graph; tied, the graph stays the PTQ one.
    """
    ranges = (q._scale, q._zero_point) if q.desc.asymmetric else (q._amax,)
    key = (fmt, q.desc, *((tuple(t.shape), t.detach().cpu().numpy().tobytes()) for t in ranges))
    first = tied.get(key)
    if first is None:
        q.init_learn_amax()
        tied[key] = q
        return
    for name in ("_learned_amax", "_learned_scale", "_learned_zero_point"):
        setattr(q, name, getattr(first, name))


def _quantizers(m: nn.Module):
    """Every quantizer of one quant module."""
    return [q for qs in m.quantizers.values() for q in qs.values()]


def finish_qat(qmodel: nn.Module) -> None:
    """End training: learned ranges become plain calibrated ranges, weight ranges the max of the final weights."""
    for m in qmodel.modules():
        if isinstance(m, QuantMixin):
            for q in _quantizers(m):
                if q.learned:
                    q.store_learned()
                q.track_max = False
            m.calibrate_weights()
    _state(qmodel).prepared_digest = parameters_digest(qmodel)


def _clamp_ranges(qmodel: nn.Module) -> None:
    for m in qmodel.modules():
        if isinstance(m, QuantMixin):
            for q in _quantizers(m):
                if q.learned:
                    q.clamp_learned()


def _refresh_weight_ranges(qmodel: nn.Module) -> None:
    for m in qmodel.modules():
        if isinstance(m, QuantMixin):
            m.calibrate_weights()


def _train_mode(qmodel: nn.Module) -> None:
    """Train mode with BatchNorm frozen (running statistics neither used from the batch nor updated)."""
    qmodel.train()
    for m in qmodel.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def fingerprint(qmodel: nn.Module, train_data: Sequence, config: QATConfig) -> str:
    """SHA-256 of what a QAT run depends on: plan, float weights, calibration, training data, config."""
    st = _state(qmodel)
    h = Hasher()
    h.update(json.dumps({"plan": st.plan.to_dict(), "backend": st.backend, "calib_method": st.calib_method,
                         "weights": st.weights_digest, "calib": st.calib_digest,
                         "config": dataclasses.asdict(config)}, sort_keys=True))
    for b in train_data:
        h.update(b)
    return h.hexdigest()


def _param_groups(qmodel: nn.Module, weight_decay: float) -> list[dict]:
    weights, ranges = [], []
    for name, p in qmodel.named_parameters():
        if p.requires_grad:
            (ranges if "._learned_" in f".{name}" else weights).append(p)
    return [{"params": weights, "weight_decay": weight_decay}, {"params": ranges, "weight_decay": 0.0}]


def _cosine_lr(peak: float, step: int, total: int) -> float:
    return 0.5 * peak * (1.0 + math.cos(math.pi * step / max(1, total)))


# --------------------------------------------------------------------------- checkpoints
def _write_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(path, buf.getvalue())


def _read_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickles that are not plain data
        raise CheckpointError(f"{str(path)!r} is not a readable QAT checkpoint ({type(e).__name__}); delete it "
                              "or pass restart=True (--restart) to start over.") from None
    if not isinstance(state, dict) or state.get("format") != _CKPT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a mixq QAT checkpoint; delete it or pass restart=True.")
    return state


# --------------------------------------------------------------------------- training
def qat(qmodel: nn.Module, teacher: nn.Module, train_data: Sequence, config: QATConfig = QATConfig(), *,
        eval_data: Optional[Sequence] = None, metric_fn: Optional[Callable] = None,
        step_fn: Optional[Callable[[nn.Module, nn.Module, Any], torch.Tensor]] = None,
        checkpoint_dir: Optional[str | os.PathLike] = None, restart: bool = False, progress: bool = True,
        log: Optional[Callable[[str], None]] = print,
        on_epoch_end: Optional[Callable[[int, dict], None]] = None) -> QATResult:
    """Fine-tune ``qmodel`` (in place) under its plan, then fix its ranges (``finish_qat``).

    Args:
        qmodel: a calibrated model from ``mixq.quantize`` (prepared from the model in eval mode, so
            BatchNorm is folded), running the plan to train.
        teacher: the FP32 model to distil (run in eval mode, without gradients).
        train_data: a sequence of batches: ``(inputs, targets)`` pairs, or inputs alone.
        config: epochs, learning rate, loss (``QATConfig``).
        eval_data / metric_fn: validation batches and metric, evaluated after every epoch.
        step_fn: ``step_fn(student, teacher, batch) -> loss`` replacing the default distillation loss.
        checkpoint_dir: folder of the per-epoch checkpoint; an existing one resumes the run.
        restart: ignore an existing checkpoint and start over.
        progress: show a progress bar with the running loss (on a terminal).
        log: where the line per epoch goes (None: nowhere).
        on_epoch_end: called with (epoch number, record) after each epoch's checkpoint.

    Returns:
        A ``QATResult``.

    Raises:
        ConfigError: a bad config, an uncalibrated model, empty training data, or eval_data without metric_fn.
        StaleCheckpointError: the checkpoint was written for another plan, model, calibration, data or config.
        CheckpointError: an unreadable checkpoint.
    """
    if not isinstance(config, QATConfig):
        raise ConfigError(f"config must be a mixq.qat.QATConfig, but got {type(config).__name__}.")
    train_data = list(train_data)
    if not train_data:
        raise ConfigError("train_data holds no batch: pass a sequence of (inputs, targets) or input batches.")
    if eval_data is not None and metric_fn is None:
        raise ConfigError("eval_data needs a metric_fn (outputs, targets) -> per-sample scores.")
    prepare_qat(qmodel, config.learn_ranges)
    teacher.eval()
    digest = fingerprint(qmodel, train_data, config)
    opt = torch.optim.AdamW(_param_groups(qmodel, config.weight_decay), lr=config.lr)
    result, start = QATResult(), 0
    ckpt = Path(checkpoint_dir) / CKPT if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.exists() and not restart:
        state = _read_checkpoint(ckpt)
        if state.get("fingerprint") != digest:
            raise StaleCheckpointError(
                f"the checkpoint {str(ckpt)!r} was written for another plan, float model, calibration, training data "
                f"or config (fingerprint {str(state.get('fingerprint'))[:12]}, this run {digest[:12]}); delete it "
                "or pass restart=True (--restart) to start over.")
        qmodel.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = result.resumed_from = int(state["epoch"])
        result.history = list(state["history"])
        if log and start:
            log(f"qat: resuming after epoch {start}/{config.epochs} from {ckpt}")
    total = config.epochs * len(train_data)
    t0 = time.perf_counter()
    for epoch in range(start, config.epochs):
        record = _run_epoch(qmodel, teacher, train_data, config, opt, epoch, total, step_fn, progress)
        if eval_data is not None:
            from mixq.evaluate import evaluate

            qmodel.eval()
            record["metric"] = evaluate(qmodel, eval_data, metric_fn).metric
        result.history.append(record)
        _refresh_weight_ranges(qmodel)  # the saved ranges are those of the saved weights
        if ckpt is not None:
            _write_checkpoint(ckpt, {"format": _CKPT_FORMAT, "fingerprint": digest, "epoch": epoch + 1,
                                     "model": qmodel.state_dict(), "optimizer": opt.state_dict(),
                                     "history": result.history})
        if log:
            metric = f", validation metric {record['metric']:.2f}" if "metric" in record else ""
            log(f"qat: epoch {epoch + 1}/{config.epochs}: loss {record['loss']:.4f}{metric}")
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    result.seconds = time.perf_counter() - t0
    finish_qat(qmodel)
    qmodel.eval()
    return result


def _run_epoch(qmodel: nn.Module, teacher: nn.Module, train_data: list, config: QATConfig,
               opt: torch.optim.Optimizer, epoch: int, total: int, step_fn: Optional[Callable],
               progress: bool) -> dict:
    """One pass over the batches in this epoch's order; returns {"epoch", "loss"} (mean loss)."""
    order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order), desc=f"qat epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False,
                   disable=None, dynamic_ncols=True)
    losses = []
    _train_mode(qmodel)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed * 1_000_003 + epoch)  # dropout repeats on a resumed run
        try:
            for i, idx in enumerate(order.tolist()):
                for g in opt.param_groups:
                    g["lr"] = _cosine_lr(config.lr, epoch * len(train_data) + i, total)
                batch = train_data[idx]
                if step_fn is not None:
                    loss = step_fn(qmodel, teacher, batch)
                else:
                    inputs, targets = _split_batch(batch)
                    with torch.no_grad():
                        ref = call_model(teacher, inputs)
                    loss = distillation_loss(call_model(qmodel, inputs), ref, targets, config.loss,
                                             config.temperature, config.task_weight)
                if not torch.isfinite(loss):
                    raise MixqError(f"the QAT loss is {float(loss)} at epoch {epoch + 1}, batch {i + 1}: lower the "
                                    f"learning rate (now {config.lr}).")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                _clamp_ranges(qmodel)
                losses.append(float(loss.detach()))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}")
        finally:
            if bar is not None:
                bar.close()
    return {"epoch": epoch + 1, "loss": sum(losses) / len(losses)}


# --------------------------------------------------------------------------- the trained model on disk
def save_trained(qmodel: nn.Module, path: str | os.PathLike, extra: Optional[dict] = None) -> Path:
    """Save a QAT model (its trained weights and ranges) to the folder ``path``: ``model.pt`` + ``qat.json``.

    ``load_trained`` rebuilds it from the float model it was made from. The metadata is written last
    and holds the SHA-256 of ``model.pt``.

    Raises:
        CheckpointError: the model is still training (learned ranges not fixed: call ``finish_qat``).
    """
    from mixq.checkpoint import _versions

    st = _state(qmodel)
    if any(isinstance(m, QuantMixin) and any(q.learned for q in _quantizers(m))
           for m in qmodel.modules()):
        raise CheckpointError("the model still has learned range parameters: call mixq.qat.finish_qat(qmodel) first.")
    buf = io.BytesIO()
    torch.save(qmodel.state_dict(), buf)
    blob = buf.getvalue()
    folder = Path(path)
    meta = {"format": _FILE_FORMAT, "version": _FILE_VERSION, "versions": _versions(),
            "weights_digest": st.weights_digest, "calib_digest": st.calib_digest, "calib_batches": st.calib_batches,
            "calib_method": st.calib_method, "backend": st.backend, "mode": st.mode,
            "prepare_options": st.prepare_options, "formats": list(st.formats), "kinds": st.kinds,
            "plan": st.plan.to_dict(), "not_run": [dataclasses.asdict(n) for n in st.not_run],
            "model_sha256": hashlib.sha256(blob).hexdigest(), **(extra or {})}
    write_atomic(folder / MODEL, blob)
    write_atomic(folder / META, json.dumps(meta, indent=1))
    return folder


def read_trained_meta(path: str | os.PathLike) -> dict:
    """The metadata of a saved QAT model.

    Raises:
        CheckpointError: no QAT model there.
    """
    p = Path(path) / META
    try:
        meta = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{str(path)!r} holds no trained QAT model ({META} missing or unreadable); "
                              "write one with `mixq qat` or mixq.qat.save_trained.") from None
    if not isinstance(meta, dict) or meta.get("format") != _FILE_FORMAT or meta.get("version") != _FILE_VERSION:
        raise CheckpointError(f"{str(p)!r} is not a mixq QAT model of file version {_FILE_VERSION}; train it again.")
    return meta


def load_trained(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild the QAT model saved at ``path`` from the float ``model`` it was trained from.

    Raises:
        CheckpointError: no model there, a damaged file, or other units than saved.
        StaleCheckpointError: other float weights, or other mixq / torch versions than saved.
    """
    from mixq.checkpoint import _check_current
    from mixq.noop import NotRun
    from mixq.plan import QuantPlan
    from mixq.quantize import add_formats, prepare, set_plan

    meta = read_trained_meta(path)
    _check_current(meta, model, None)
    raw = (Path(path) / MODEL).read_bytes() if (Path(path) / MODEL).is_file() else b""
    if hashlib.sha256(raw).hexdigest() != meta["model_sha256"]:
        raise CheckpointError(f"{str(Path(path) / MODEL)!r} is missing or does not match {META}; train it again.")
    state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    opts = meta["prepare_options"]
    qmodel = prepare(model.eval(), meta["backend"], meta["mode"], None, opts.get("preserved_attributes", ()),
                     opts.get("fold_bn"))
    st = _state(qmodel)
    if st.kinds != meta["kinds"]:
        raise CheckpointError(f"the model's units differ from the saved ones: {len(st.kinds)} now, "
                              f"{len(meta['kinds'])} saved.")
    st.calib_method = meta["calib_method"]
    add_formats(qmodel, meta["formats"], meta["calib_method"])
    qmodel.load_state_dict(state)
    st.prepare_options = opts
    st.calibrated, st.calib_digest, st.calib_batches = True, meta["calib_digest"], meta["calib_batches"]
    st.not_run = [NotRun(**n) for n in meta.get("not_run", [])]
    st.prepared_digest = parameters_digest(qmodel)
    set_plan(qmodel, QuantPlan.from_dict(meta["plan"]))
    return qmodel.eval()


def train_batches(inputs: torch.Tensor, targets: Optional[torch.Tensor], batch_size: int) -> list:
    """Split tensors into a list of ``(inputs, targets)`` (or input) batches of ``batch_size``."""
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be > 0, but got {batch_size}.")
    out = []
    for i in range(0, len(inputs), batch_size):
        x = inputs[i:i + batch_size]
        out.append(x if targets is None else (x, targets[i:i + batch_size]))
    return out


__all__ = ["QATConfig", "QATResult", "qat", "prepare_qat", "finish_qat", "distillation_loss", "save_trained",
           "load_trained", "read_trained_meta", "fingerprint", "train_batches", "output_loss_kind"]
