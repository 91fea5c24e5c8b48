"""Tests of models/nets/."""
