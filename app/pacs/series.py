"""What the PACS says about a series before any pixels move, and the checks that must pass before fusion.

Fusing two series is refused unless they belong together: same patient (PatientID, and IssuerOfPatientID
when both carry one), same study, same frame of reference (when both carry one; with ``register: rigid`` a
different one is accepted and registered later), and the right roles (the
anatomical series is MR; the functional one PT, NM or CT). All of it comes from a series-level query, so a
refusal costs no retrieval. A refusal names the tag; the values are for the operator's terminal only (they
may be patient identifiers) and never go to a log line.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from models.volumes.volume import different_frames

ANATOMICAL_MODALITIES = ("MR",)
FUNCTIONAL_MODALITIES = ("PT", "NM", "CT")

# Series-level query keys (QIDO-RS includefield / C-FIND return keys).
QUERY_KEYS = ("SeriesInstanceUID", "Modality", "SeriesDescription", "NumberOfSeriesRelatedInstances", "PatientID",
              "IssuerOfPatientID", "StudyInstanceUID", "FrameOfReferenceUID")


@dataclass(frozen=True)
class SeriesInfo:
    """One series as a series-level query describes it."""

    uid: str
    modality: str
    description: str
    count: int
    patient_id: str
    issuer_of_patient_id: str
    study_uid: str
    frame_of_reference_uid: str

    @classmethod
    def from_dataset(cls, ds: Dataset) -> SeriesInfo:
        """From a QIDO-RS JSON result (via ``Dataset.from_json``) or a C-FIND identifier."""
        def text(name: str) -> str:
            value = getattr(ds, name, "")
            return "" if value is None else str(value).strip()

        count = text("NumberOfSeriesRelatedInstances")
        return cls(uid=text("SeriesInstanceUID"), modality=text("Modality"), description=text("SeriesDescription"),
                   count=int(count) if count.isdigit() else 0, patient_id=text("PatientID"),
                   issuer_of_patient_id=text("IssuerOfPatientID"), study_uid=text("StudyInstanceUID"),
                   frame_of_reference_uid=text("FrameOfReferenceUID"))


class SeriesRefused(ValueError):
    """The two series must not be fused together. ``tag`` names why; the values are for the operator only."""

    def __init__(self, tag: str, reason: str, mri_value: str, functional_value: str) -> None:
        super().__init__(f"refused: {tag} {reason}")
        self.tag, self.reason = tag, reason
        self.mri_value, self.functional_value = mri_value, functional_value


def check_partners(study: str, mri: SeriesInfo, functional: SeriesInfo, allow_other_frame: bool = False) -> None:
    """Raise :class:`SeriesRefused` unless ``mri`` and ``functional`` may be fused into ``study``.

    ``allow_other_frame``: different Frames of Reference are accepted (``register: rigid``); the series will
    be registered, and the registration checked, before anything is fused.
    """
    if mri.patient_id != functional.patient_id:
        raise SeriesRefused("PatientID", "differs between the two series (two different patients?)",
                            mri.patient_id, functional.patient_id)
    a, b = mri.issuer_of_patient_id, functional.issuer_of_patient_id
    if a and b and a != b:
        raise SeriesRefused("IssuerOfPatientID", "differs between the two series", a, b)
    if mri.study_uid != functional.study_uid:
        raise SeriesRefused("StudyInstanceUID", "differs between the two series", mri.study_uid,
                            functional.study_uid)
    if mri.study_uid != study:
        raise SeriesRefused("StudyInstanceUID", "of the series is not the study named on the command line",
                            mri.study_uid, study)
    a, b = mri.frame_of_reference_uid, functional.frame_of_reference_uid
    if different_frames(a, b) and not allow_other_frame:
        raise SeriesRefused("FrameOfReferenceUID", "differs: the series are not in one patient coordinate system "
                            "(set register: rigid to register them)", a, b)
    if mri.modality not in ANATOMICAL_MODALITIES:
        raise SeriesRefused("Modality", f"of the anatomical series must be MR, not {mri.modality or 'empty'}",
                            mri.modality, functional.modality)
    if functional.modality not in FUNCTIONAL_MODALITIES:
        raise SeriesRefused("Modality", "of the functional series must be PT, NM or CT, not "
                            f"{functional.modality or 'empty'}", mri.modality, functional.modality)
