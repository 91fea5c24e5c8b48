"""The ``dmfnet`` command: one entry point composed of the command groups of app/ and models/."""
