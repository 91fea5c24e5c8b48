"""Running the networks: the fusion pipelines (DM-FNet and the fast tier), tiling, weights files, runtimes
(torch, ONNX Runtime, OpenVINO), export, hardware and precision choice. Stands on ``models.nets`` and
``models.images``; never imports volumes, training, evaluation or HTTP."""
