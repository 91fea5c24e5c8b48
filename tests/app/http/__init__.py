"""Tests of app/http/."""
