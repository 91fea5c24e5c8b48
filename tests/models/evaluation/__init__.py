"""Tests of models/evaluation/."""
