"""What the tests and the benchmarks share, never the shipped product: a real ``dmfnet serve`` on a free port
(servers), a real Orthanc (orthanc), phantom studies as DICOM series (studies) and the recorded reference outputs
(reference_outputs). It imports nothing from tests/; app/, models/ and dmfnet/ never import it (checked by
tests/test_architecture.py), and the runtime install does not include it."""
