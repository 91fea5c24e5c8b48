"""The batching engine and the model's process: admission (by count and by decoded memory), the batch engine that
groups concurrent pairs (batcher), the child process that runs every tier (model_process) and malloc's tuning
(memory). Never imports FastAPI, Starlette, uvicorn or the HTTP layer (tests/test_architecture.py checks it):
a request reaches it as decoded pairs, whoever received them."""
