"""Side effects behind small interfaces: WARC reading, HTTP, replay, shard storage, LanceDB."""
