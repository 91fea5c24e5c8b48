"""DM-FNet fusion service: HTTP layer, batching engine, PACS bridge and the ``dmfnet`` CLI."""
