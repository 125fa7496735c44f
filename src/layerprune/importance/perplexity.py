"""Placeholder until its work item lands."""
