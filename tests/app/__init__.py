"""Tests of the service's packages."""
