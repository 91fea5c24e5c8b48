"""Tests of the science packages."""
