"""Patients' studies in mm: the Volume type, DICOM/NIfTI reading, windowing, registration, fusion along the MR
slices, the derived DICOM series, the phantom in mm and ``dmfnet fuse`` on volumes. Stands on
``models.images`` and ``models.inference``; never imports HTTP, ``app``, training or evaluation."""
