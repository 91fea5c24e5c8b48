"""Tests of models/images/."""
