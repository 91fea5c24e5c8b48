"""Tests of models/inference/."""
