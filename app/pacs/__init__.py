"""PACS integration: pull an MRI and a functional series, fuse slice by slice, store a derived series back."""
