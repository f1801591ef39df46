"""Sampler and scheduler names (the stable-diffusion.cpp vocabulary the API speaks) mapped
onto diffusers schedulers. A sampler picks the scheduler class (the solver), a scheduler
picks how the noise levels are spaced. Only pairs that diffusers can express for an
architecture are accepted; anything else is refused with the list of pairs that work."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from services.common import architectures
from services.common.errors import Violations

SAMPLERS: tuple[str, ...] = (
    "euler", "euler_a", "heun", "dpm2", "dpm++2s_a", "dpm++2m", "dpm++2mv2", "ipndm", "ipndm_v", "lcm",
    "ddim_trailing", "tcd",
)
SCHEDULERS: tuple[str, ...] = (
    "discrete", "karras", "exponential", "ays", "gits", "sgm_uniform", "simple", "smoothstep", "lcm",
)
# The /v1 API's name for the flow-matching Euler solver.
FLOWMATCH = "flowmatch"


def _is_flow(architecture: str) -> bool:
    return architectures.family(architecture).flow


@dataclass(frozen=True)
class Sampling:
    """How to run one (sampler, scheduler) pair: the diffusers scheduler class built from the
    pipeline's own scheduler config with `options` on top, and, for spacings no scheduler
    option expresses, the noise levels to pass as the pipeline's `sigmas` argument."""

    sampler: str
    scheduler: str
    scheduler_class: str
    options: tuple[tuple[str, object], ...] = ()
    sigmas: Callable[[int], list[float]] | None = field(default=None, compare=False)


# The solver of each sampler for noise-prediction (UNet) models. diffusers has no iPNDM for
# these models (its IPNDMScheduler works in a different time parameterisation), so ipndm
# and ipndm_v are not offered.
# Flow-matching models (Flux, Z-Image) sample with this one scheduler, spaced several ways.
FLOW_SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
_UNET_SOLVERS: dict[str, tuple[str, dict]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    # Second-order single-step DPM-Solver++ with its stochastic (ancestral-like) update.
    "dpm++2s_a": ("DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    # The v2 variant differs in its second-order correction; diffusers' Heun-type 2M update
    # is the closest it has.
    "dpm++2mv2": ("DPMSolverMultistepScheduler",
                  {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "heun"}),
    "lcm": ("LCMScheduler", {}),
    "ddim_trailing": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
    "tcd": ("TCDScheduler", {}),
}

# Align-Your-Steps noise levels for 10 steps (Nvidia's published schedules).
_AYS_SIGMAS = {
    architectures.SD15.name: [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    architectures.SDXL.name: [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
}


def _ays(architecture: str) -> Callable[[int], list[float]]:
    table = np.log(np.array(_AYS_SIGMAS[architecture]))

    def sigmas(steps: int) -> list[float]:
        # Log-linear interpolation of the 10-step table to `steps`, ending at zero noise.
        xs = np.linspace(0, 1, len(table))
        levels = np.exp(np.interp(np.linspace(0, 1, steps + 1), xs, table))
        levels[-1] = 0.0
        return [float(s) for s in levels]

    return sigmas


def _smoothstep_flow(steps: int) -> list[float]:
    """Noise levels 3u^2 - 2u^3 for u going evenly from 1 down (before the model's shift)."""
    out = []
    for i in range(steps):
        u = 1.0 - i / steps
        out.append(max(u * u * (3.0 - 2.0 * u), 1e-3))
    return out


def _unet_spacing(architecture: str, sampler: str, scheduler: str, solver: type) -> tuple[dict, object] | None:
    """(scheduler options, sigma function) for a spacing on a UNet solver, or None when the
    solver cannot express it."""
    import inspect

    init = inspect.signature(solver.__init__).parameters
    set_timesteps = inspect.signature(solver.set_timesteps).parameters
    if sampler == "lcm":
        # The LCM solver has its own skipping schedule: the one "lcm" names.
        return ({}, None) if scheduler in ("discrete", "lcm") else None
    if scheduler == "discrete":
        return {}, None
    if scheduler in ("sgm_uniform", "simple"):
        # Evenly spaced from the last training timestep down, which is what both name.
        return ({"timestep_spacing": "trailing"}, None) if "timestep_spacing" in init else None
    if scheduler == "karras":
        return ({"use_karras_sigmas": True}, None) if "use_karras_sigmas" in init else None
    if scheduler == "exponential":
        return ({"use_exponential_sigmas": True}, None) if "use_exponential_sigmas" in init else None
    if scheduler == "ays":
        return ({}, _ays(architecture)) if "sigmas" in set_timesteps and architecture in _AYS_SIGMAS else None
    return None


def _flow_spacing(scheduler: str) -> tuple[dict, object] | None:
    if scheduler in ("discrete", "simple", "sgm_uniform"):
        # Evenly spaced in time from pure noise: the flow-matching default.
        return {}, None
    if scheduler == "karras":
        return {"use_karras_sigmas": True}, None
    if scheduler == "exponential":
        return {"use_exponential_sigmas": True}, None
    if scheduler == "smoothstep":
        return {}, _smoothstep_flow
    return None


def scheduler_class_names() -> set[str]:
    """Every diffusers scheduler class a sampler may use."""
    return {class_name for class_name, _ in _UNET_SOLVERS.values()} | {FLOW_SCHEDULER_CLASS}


def _table(architecture: str) -> dict[tuple[str, str], Sampling]:
    import diffusers

    pairs: dict[tuple[str, str], Sampling] = {}
    if _is_flow(architecture):
        for scheduler in SCHEDULERS:
            spacing = _flow_spacing(scheduler)
            if spacing is not None:
                options, sigmas = spacing
                pairs[("euler", scheduler)] = Sampling("euler", scheduler, FLOW_SCHEDULER_CLASS,
                                                       tuple(sorted(options.items())), sigmas)
    else:
        for sampler, (class_name, solver_options) in _UNET_SOLVERS.items():
            solver = getattr(diffusers, class_name)
            for scheduler in SCHEDULERS:
                spacing = _unet_spacing(architecture, sampler, scheduler, solver)
                if spacing is not None:
                    options, sigmas = spacing
                    merged = {**solver_options, **options}
                    pairs[(sampler, scheduler)] = Sampling(sampler, scheduler, class_name,
                                                           tuple(sorted(merged.items())), sigmas)
    return pairs


_TABLES: dict[str, dict[tuple[str, str], Sampling]] = {}


def supported(architecture: str) -> dict[tuple[str, str], Sampling]:
    """Every (sampler, scheduler) pair that works for `architecture`."""
    if architecture not in _TABLES:
        _TABLES[architecture] = _table(architecture)
    return _TABLES[architecture]


def canonical(architecture: str, sampler: str | None, scheduler: str | None) -> tuple[str, str]:
    """The pair a request means: defaults filled in, "flowmatch" read as the flow Euler solver."""
    default = architectures.family(architecture).default_sampler
    sampler = sampler or default[0]
    scheduler = scheduler or default[1]
    if sampler == FLOWMATCH and _is_flow(architecture):
        sampler = "euler"
    return sampler, scheduler


def describe(architecture: str) -> str:
    by_sampler: dict[str, list[str]] = {}
    for sampler, scheduler in supported(architecture):
        by_sampler.setdefault(sampler, []).append(scheduler)
    text = "; ".join(f"{sampler} with {', '.join(schedulers)}" for sampler, schedulers in by_sampler.items())
    if _is_flow(architecture):
        text += f" ({FLOWMATCH!r} is accepted for euler)"
    return text


def check(architecture: str, sampler: str, scheduler: str, violations: Violations,
          sampler_field: str = "sampler", scheduler_field: str = "scheduler") -> None:
    """Adds a violation listing the pairs that work for this architecture when the pair is unsupported."""
    sampler, scheduler = canonical(architecture, sampler, scheduler)
    pairs = supported(architecture)
    works = describe(architecture)
    known_samplers = (*SAMPLERS, FLOWMATCH)
    if sampler not in known_samplers:
        violations.add(sampler_field, f"unknown sampler {sampler!r}; samplers are {', '.join(SAMPLERS)}. "
                                      f"Supported for {architecture}: {works}")
        return
    if scheduler not in SCHEDULERS:
        violations.add(scheduler_field, f"unknown scheduler {scheduler!r}; schedulers are {', '.join(SCHEDULERS)}. "
                                        f"Supported for {architecture}: {works}")
        return
    if (sampler, scheduler) in pairs:
        return
    if not any(s == sampler for s, _ in pairs):
        violations.add(sampler_field, f"sampler {sampler!r} is not supported for {architecture}; "
                                      f"supported: {works}")
    else:
        violations.add(scheduler_field, f"scheduler {scheduler!r} does not work with sampler {sampler!r} "
                                        f"for {architecture}; supported: {works}")


def resolve(architecture: str, sampler: str | None, scheduler: str | None) -> Sampling:
    """The Sampling for a request's pair; InvalidInput when it is unsupported."""
    violations = Violations()
    name = canonical(architecture, sampler, scheduler)
    if name not in supported(architecture):
        check(architecture, name[0], name[1], violations)
        violations.raise_if_any()
    return supported(architecture)[name]


def build_scheduler(sampling: Sampling, base_config):
    """A new scheduler of the pair's class from the pipeline's own scheduler config (its
    training betas, prediction type and shift), with the pair's options on top."""
    import diffusers

    cls = getattr(diffusers, sampling.scheduler_class)
    return cls.from_config(base_config, **dict(sampling.options))
