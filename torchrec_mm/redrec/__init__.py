"""RED-Rec: an LLM two-tower retrieval model over cross-scenario user histories."""
