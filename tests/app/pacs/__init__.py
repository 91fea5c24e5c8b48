"""Tests of app/pacs/."""
