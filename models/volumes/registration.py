"""Opt-in rigid registration of a volume in another Frame of Reference onto the MR, with plausibility checks.

SimpleITK: Euler (rotation + translation) transform, Mattes mutual information (works across modalities),
regular-step gradient descent over three resolutions, started from the centres of mass. A result is refused
(never fused silently) when any check fails:
* the metric ended worse than it started (by more than 1%: sampling noise aside, the optimiser went astray),
* three starts (0 and +-10 deg about the head's long axis) do not end within ``max_spread_mm`` (3 mm, about
  one PET voxel, over the central half of the MR volume) of the best one: a local optimum, not an answer,
* rotation > ``max_rotation_deg`` (15 by default: patients lie head-first supine in both scanners),
* translation beyond the centre-of-mass alignment > ``max_translation_mm`` (60),
* normalised mutual information (Studholme) after registration < ``min_nmi`` (1.05): an unrelated volume
  reaches ~1.0 whatever the transform, related anatomy clearly more.
Deterministic: fixed sampling seed, one thread (partial sums would otherwise vary in order: ~1e-9 mm apart).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from models.volumes.volume import GeometryError, Volume, resample_onto

START_TURN_DEG = 10.0
METRIC_SLACK = 0.01  # sampling noise: an already-aligned start may end a hair worse, and that is no failure


class RegistrationRefused(GeometryError):
    """The registration result is implausible; the message says which check failed and the numbers."""


@dataclass(frozen=True)
class RegistrationLimits:
    """What a plausible rigid registration between two scans of one patient looks like."""

    max_rotation_deg: float = 15.0
    max_translation_mm: float = 60.0
    min_nmi: float = 1.05
    max_spread_mm: float = 3.0


@dataclass
class Registration:
    """A checked rigid transform: it maps MR points (mm) to points of the registered volume."""

    transform: sitk.Euler3DTransform
    metric_start: float
    metric_final: float
    rotation_deg: float
    translation_mm: float
    nmi: float
    via: str  # modality of the volume that was registered (CT of a PET/CT, or the functional itself)

    def describe(self) -> str:
        """One line for the log and the derived series' DerivationDescription."""
        angles = ", ".join(f"{math.degrees(a):.2f}" for a in (self.transform.GetAngleX(),
                                                               self.transform.GetAngleY(), self.transform.GetAngleZ()))
        t = ", ".join(f"{v:.1f}" for v in self.transform.GetTranslation())
        return (f"rigid registration ({self.via} to MR, Mattes MI {self.metric_start:.4f} -> {self.metric_final:.4f}, "
                f"NMI {self.nmi:.3f}): rotation [{angles}] deg, translation [{t}] mm")


def _nmi(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    """Normalised mutual information (H(A) + H(B)) / H(A, B) of two same-shape arrays."""
    joint, _, _ = np.histogram2d(a.ravel(), b.ravel(), bins=bins)
    p = joint / max(joint.sum(), 1)

    def entropy(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    h_joint = entropy(p)
    return (entropy(p.sum(0)) + entropy(p.sum(1))) / h_joint if h_joint > 0 else 1.0


def _method() -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed=20251129)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=4.0, minStep=1e-3, numberOfIterations=300,
                                                 gradientMagnitudeTolerance=1e-8, relaxationFactor=0.5)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return reg


def register_rigid(mr: Volume, moving: Volume, limits: RegistrationLimits | None = None) -> Registration:
    """Register ``moving`` (CT, PET or SPECT in its own Frame of Reference) to ``mr``; raise
    :class:`RegistrationRefused` when the result fails a plausibility check (see the module docstring)."""
    limits = limits or RegistrationLimits()
    if moving.is_rgb:
        raise RegistrationRefused("a colour (RGB) series cannot be registered; register its grayscale source")
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # bit-for-bit repeatable (sums in one order)
    try:
        return _register(mr, moving, limits)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _optimise(fixed: sitk.Image, mov: sitk.Image, start: sitk.Euler3DTransform) -> tuple[sitk.Euler3DTransform, float,
                                                                                      float]:
    """(optimised transform, metric at the start, metric at the end) from one starting transform."""
    result = sitk.Euler3DTransform(start)
    reg = _method()
    reg.SetInitialTransform(result, inPlace=True)  # optimised in place: stays an Euler transform
    metric_start = reg.MetricEvaluate(fixed, mov)
    reg.Execute(fixed, mov)
    check = _method()
    check.SetInitialTransform(result, inPlace=False)
    return result, metric_start, check.MetricEvaluate(fixed, mov)


def _disagreement(a: sitk.Transform, b: sitk.Transform, points: np.ndarray) -> float:
    """Largest distance (mm) between where two transforms send the given points."""
    return max(float(np.linalg.norm(np.subtract(a.TransformPoint(tuple(p)), b.TransformPoint(tuple(p)))))
               for p in points)


def _register(mr: Volume, moving: Volume, limits: RegistrationLimits) -> Registration:
    fixed, mov = mr.to_sitk(), moving.to_sitk()
    start = sitk.Euler3DTransform(sitk.CenteredTransformInitializer(
        fixed, mov, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS))
    runs = []
    for turn in (0.0, -START_TURN_DEG, START_TURN_DEG):  # about the head's long axis, where starts differ most
        s = sitk.Euler3DTransform(start)
        s.SetRotation(0.0, 0.0, math.radians(turn))
        runs.append(_optimise(fixed, mov, s))
    result, metric_start, metric_final = min(runs, key=lambda r: r[2])
    centre = mr.corners().mean(axis=0)
    inner = centre + (mr.corners() - centre) / 2  # the central half of the MR volume, where the anatomy is
    spread = max(_disagreement(result, r[0], inner) for r in runs)
    rotation = math.degrees(math.acos(np.clip((np.trace(np.array(result.GetMatrix()).reshape(3, 3)) - 1) / 2, -1, 1)))
    shift = float(np.linalg.norm(np.subtract(result.GetTranslation(), start.GetTranslation())))
    on_mr = resample_onto(moving, mr, result)
    inside = on_mr != 0
    nmi = _nmi(mr.array[inside], on_mr[inside]) if inside.sum() > 100 else 1.0
    out = Registration(result, metric_start, metric_final, rotation, shift, nmi, moving.modality or "volume")
    problems = []
    if metric_final > metric_start + METRIC_SLACK * abs(metric_start):  # already aligned may gain nothing
        problems.append(f"the metric got worse ({metric_start:.4f} -> {metric_final:.4f})")
    if spread > limits.max_spread_mm:
        problems.append(f"three starts ended {spread:.1f} mm apart (> {limits.max_spread_mm:g}): no single "
                        "answer")
    if rotation > limits.max_rotation_deg:
        problems.append(f"rotation {rotation:.1f} deg > {limits.max_rotation_deg:g}")
    if shift > limits.max_translation_mm:
        problems.append(f"translation {shift:.1f} mm beyond the centre-of-mass alignment > "
                        f"{limits.max_translation_mm:g}")
    if nmi < limits.min_nmi:
        problems.append(f"normalised mutual information {nmi:.3f} < {limits.min_nmi:g} (unrelated volumes?)")
    if problems:
        raise RegistrationRefused("registration refused as implausible: " + "; ".join(problems))
    return out
