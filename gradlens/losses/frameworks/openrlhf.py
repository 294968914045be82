"""OpenRLHF's policy loss, called as OpenRLHF's own code: ``openrlhf:ppo``, ``openrlhf:gspo``.

``openrlhf:<policy_loss_type>`` builds OpenRLHF's ``PolicyLoss`` (``openrlhf/models/loss.py``)
the way its PPO actor does (``trainer/ray/ppo_actor.py``) and calls its ``forward`` on
gradlens's log-probs:

    PolicyLoss / CLI                 gradlens                   note
    clip_eps_low, clip_eps_high      loss.eps_low, eps_high     --actor.eps_clip_low_high
    dual_clip                        loss.dual_clip             off by default, as in gradlens
    token_level_loss                 loss.aggregation           token_mean → True,
                                                                seq_mean_token_mean → False;
                                                                OpenRLHF has no other mode;
                                                                gspo forces False
    is_correction_level/mode/        loss.corrections           token_tis → token/clip;
    threshold                                                   token_mis, icepop → token/mask;
                                                                geo_mask (with or without an
                                                                unbounded token_mis) → seq/mask,
                                                                which keeps the token ρ (A13)

It is called without the trainer's batch info, so its aggregation is the masked mean of one
data-parallel rank: N_tok valid tokens, or B' sequences with a valid token (OpenRLHF's
``get_loss_batch_info`` counts the same; it never counts empty rows, whatever
``loss.count_empty_sequences`` says).

``openrlhf:<type>+kl`` adds the actor's KL loss: ``compute_approx_kl(log_probs, ref, old,
kl_estimator, unbiased_gradient)`` aggregated by ``aggregate_loss`` with its default
``token_level_loss=True`` — a token mean whatever the policy's aggregation — times
``loss.kl_coef``. ``loss.kl_estimator`` k1, k2, k3 map to themselves, ``unbiased`` to
``unbiased_gradient=True`` (value of k3; the gradient w·(ℓ − ℓ_ref), w = min(r, 10) detached).
OpenRLHF computes the KL in float32 (``log_probs.float()``) and clamps it to ±10.

Importing. ``openrlhf/models/__init__.py`` imports the actor (peft, flash-attn) and
``models/utils.py`` imports deepspeed at its top, none of which the loss uses. With them
installed, gradlens imports ``openrlhf.models.loss`` as it is. Without them it loads the
installed ``models/loss.py`` unmodified, under a private package name, and satisfies its one
import (``from .utils import masked_mean``) with a module compiled from the installed
``models/utils.py``'s own definitions of ``masked_mean``, ``compute_approx_kl`` and
``KL_IS_WEIGHT_CLIP`` (nothing else of that file runs). Every line that computes the loss is
OpenRLHF's.

Supported: OpenRLHF 0.11 (read from 0.11.2, tested with 0.11.2).
"""

from __future__ import annotations

import ast
import importlib
import sys
import types
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from torch import Tensor

from gradlens.containers import TokenInputs
from gradlens.errors import GradlensError
from gradlens.losses.aggregation import Aggregation
from gradlens.losses.base import Correction, LossParams, LossSpec
from gradlens.losses.external import Call, autograd_terms, raised, reported_metrics, scalar_loss
from gradlens.losses.frameworks.base import Framework, require, split_kl, unknown_framework_loss

NAMES = ("ppo", "gspo")
TOKEN_LEVEL = {"token_mean": True, "seq_mean_token_mean": False}
KL_ESTIMATORS = {"k1": ("k1", False), "k2": ("k2", False), "k3": ("k3", False)}
KL_ESTIMATORS["unbiased"] = ("k3", True)  # (kl_estimator, unbiased_gradient)
UTILS_KEPT = ("masked_mean", "compute_approx_kl", "KL_IS_WEIGHT_CLIP")
PRIVATE_PACKAGE = "gradlens_openrlhf_models"
METRICS = ("ppo_clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio")  # experience.info keys
INSTALL = 'pip install -e ".[frameworks]" && pip install --no-deps "openrlhf==0.11.2"'


@dataclass(frozen=True)
class OpenRLHFApi:
    version: str
    loss: Any  # openrlhf.models.loss
    utils: Any  # masked_mean, compute_approx_kl
    route: str


def _defines(node: ast.stmt, names: tuple[str, ...]) -> bool:
    """A top-level ``def`` or assignment of one of ``names``."""
    if isinstance(node, ast.FunctionDef):
        return node.name in names
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id in names for t in node.targets)
    return False


def _utils_from_source(path: Path) -> types.ModuleType:
    """The installed utils.py's own masked_mean, compute_approx_kl and KL_IS_WEIGHT_CLIP."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    body: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            roots = {alias.name.split(".")[0] for alias in node.names}
            source = node.module if isinstance(node, ast.ImportFrom) else None
            if roots <= {"torch", "typing", "os"} or source == "typing":
                body.append(node)
        elif _defines(node, UTILS_KEPT):
            body.append(node)
    module = types.ModuleType(f"{PRIVATE_PACKAGE}.utils")
    module.__file__ = str(path)
    module.__package__ = PRIVATE_PACKAGE
    code = compile(ast.Module(body=body, type_ignores=[]), str(path), "exec")
    exec(code, module.__dict__)  # OpenRLHF's own function definitions, nothing else
    missing = [n for n in UTILS_KEPT if not hasattr(module, n)]
    if missing:
        raise GradlensError(f"OpenRLHF's models/utils.py no longer defines {', '.join(missing)}")
    return module


def _load_private(models_dir: Path) -> tuple[Any, Any]:
    """models/loss.py as it is, under a private package whose ``.utils`` is the module above."""
    if f"{PRIVATE_PACKAGE}.loss" in sys.modules:
        return sys.modules[f"{PRIVATE_PACKAGE}.loss"], sys.modules[f"{PRIVATE_PACKAGE}.utils"]
    package = types.ModuleType(PRIVATE_PACKAGE)
    package.__path__ = [str(models_dir)]
    package.__package__ = PRIVATE_PACKAGE
    sys.modules[PRIVATE_PACKAGE] = package
    utils = _utils_from_source(models_dir / "utils.py")
    sys.modules[utils.__name__] = utils
    return importlib.import_module(f"{PRIVATE_PACKAGE}.loss"), utils


@cache
def openrlhf_api(name: str) -> OpenRLHFApi:
    version = require(FRAMEWORK, name)
    try:
        from openrlhf.models import loss, utils

        return OpenRLHFApi(version, loss, utils, "openrlhf.models")
    except Exception:  # no deepspeed, flash-attn or peft: the loss file alone
        pass
    try:
        import openrlhf

        models_dir = Path(openrlhf.__file__).resolve().parent / "models"
        loss, utils = _load_private(models_dir)
    except GradlensError:
        raise
    except Exception as exc:
        raise GradlensError(
            f"loss {name!r}: loading OpenRLHF {version}'s models/loss.py raised {raised(exc)}"
        ) from None
    route = "models/loss.py without deepspeed (utils.py's masked_mean and compute_approx_kl)"
    return OpenRLHFApi(version, loss, utils, route)


def correction_kwargs(corrections: tuple[Correction, ...], name: str) -> dict[str, Any]:
    """gradlens's corrections as PolicyLoss's is_correction_* arguments, or a clear error."""
    kinds = {c.kind: c for c in corrections}
    if not kinds:
        return {"is_correction_level": "off"}
    token = kinds.get("token_mis")
    unbounded = token is not None and (token.low, token.high) == (None, None)
    if "geo_mask" in kinds and (len(kinds) == 1 or (len(kinds) == 2 and unbounded)):
        c = kinds["geo_mask"]
        level, mode = "seq", "mask"
    elif len(kinds) == 1 and "seq_mask_tis" in kinds:  # the same weight as one kind (A13)
        c = kinds["seq_mask_tis"]
        level, mode = "seq", "mask"
    elif len(kinds) == 1 and next(iter(kinds)) in ("token_tis", "token_mis", "icepop"):
        c = corrections[0]
        level, mode = "token", "clip" if c.kind == "token_tis" else "mask"
    else:
        raise GradlensError(
            f"loss {name!r}: OpenRLHF applies one correction: token_tis, token_mis, icepop, "
            f"seq_mask_tis or geo_mask (with an unbounded token_mis, trap A13); got "
            f"{', '.join(kinds)}"
        )
    low = c.low if c.low is not None else 0.0
    high = c.high if c.high is not None else float("inf")
    return {
        "is_correction_level": level,
        "is_correction_mode": mode,
        "is_correction_threshold": (low, high),
    }


def openrlhf_call(api: OpenRLHFApi, loss_type: str, with_kl: bool, name: str) -> Call:
    def call(
        logp: Tensor, inputs: TokenInputs, params: LossParams, agg: Aggregation
    ) -> tuple[Tensor, dict[str, float]]:
        if agg.mode not in TOKEN_LEVEL and loss_type != "gspo":
            raise GradlensError(
                f"loss {name!r}: OpenRLHF 0.11 aggregates with token-mean or "
                f"seq-mean-token-mean; loss.aggregation = {agg.mode} has no OpenRLHF twin"
            )
        if with_kl and params.kl_estimator not in KL_ESTIMATORS:
            raise GradlensError(f"loss {name!r}: no OpenRLHF estimator {params.kl_estimator}")
        mask = inputs.mask.to(logp.dtype)
        rollout = inputs.rollout_logp
        if params.corrections and rollout is None:
            raise GradlensError(
                f"loss {name!r}: loss.corrections need the rollout log-probs μ_old, and this "
                "batch has none: set source.rollout_drift (synthetic) or rollout_prob"
            )
        try:
            policy = api.loss.PolicyLoss(
                clip_eps_low=params.eps_low,
                clip_eps_high=params.eps_high,
                dual_clip=params.dual_clip,
                token_level_loss=TOKEN_LEVEL.get(agg.mode, False),
                policy_loss_type=loss_type,
                **correction_kwargs(params.corrections, name),
            )
            out = policy(
                logp,
                inputs.old_logp,
                inputs.advantages,
                action_mask=mask,
                rollout_log_probs=rollout,
            )
            total, metrics = out[0], dict(zip(METRICS, out[1:], strict=False))
            if with_kl:
                estimator, unbiased = KL_ESTIMATORS[params.kl_estimator]
                ref = inputs.ref_logp if inputs.ref_logp is not None else inputs.old_logp
                kl = api.utils.compute_approx_kl(
                    logp,
                    ref,
                    log_probs_old=inputs.old_logp,
                    kl_estimator=estimator,
                    unbiased_gradient=unbiased,
                )
                kl_loss = api.loss.aggregate_loss(kl, mask)  # token_level_loss=True: OpenRLHF's
                total = total + params.kl_coef * kl_loss
                metrics["kl"] = kl_loss.detach()
        except GradlensError:
            raise
        except Exception as exc:
            raise GradlensError(f"loss {name!r}: OpenRLHF raised {raised(exc)}") from None
        reported = reported_metrics((k, v) for k, v in metrics.items() if v is not None)
        return scalar_loss(total, name, tuple(logp.shape)), reported

    return call


def resolve(name: str, rest: str) -> LossSpec:
    """The `LossSpec` of ``openrlhf:ppo[+kl]`` or ``openrlhf:gspo[+kl]``."""
    loss_type, with_kl = split_kl(rest)
    if loss_type not in NAMES:
        raise GradlensError(unknown_framework_loss(FRAMEWORK, name, loss_type, list(NAMES)))
    api = openrlhf_api(name)
    kl = " + kl_coef·aggregate_loss(compute_approx_kl) (token mean)" if with_kl else ""
    return LossSpec(
        name=name,
        fn=None,
        aggregating_fn=autograd_terms(openrlhf_call(api, loss_type, with_kl, name), name),
        formula=f"OpenRLHF {api.version} PolicyLoss(policy_loss_type={loss_type!r}){kl}; "
        "arguments from loss.* (losses.md §9)",
        grad_formula="∂L/∂ℓ_t by autograd through OpenRLHF's own code (exact)",
        zero_when="where OpenRLHF's gradient in ℓ_t is 0",
        paper=f"OpenRLHF {api.version}, models/loss.py PolicyLoss (imported as {api.route})",
        post_formula="|c|·(1 − π_y)",
        needs=("ref_logp",) if with_kl else (),
        handles_corrections=True,
    )


FRAMEWORK = Framework(
    prefix="openrlhf",
    distribution="openrlhf",
    supported=((0, 11), (0, 12)),
    tested="0.11.2",
    install=INSTALL,
    names=NAMES,
    resolve=resolve,
)
