"""DM-FNet science, by concern: ``nets`` (what the networks are), ``images`` (2-D images in and out),
``inference`` (running the networks), ``volumes`` (patients' studies in mm), ``training``, ``evaluation``.

Never imports HTTP (fastapi, starlette, uvicorn) or ``app``; ``tests/test_architecture.py`` checks which package
may import which.
"""

__version__ = "0.1.0"
