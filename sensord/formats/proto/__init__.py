"""Generated protobuf modules (see each file's header for where it comes from)."""
