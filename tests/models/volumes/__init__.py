"""Tests of models/volumes/."""
