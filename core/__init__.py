"""The case domain and the conversation state machine. Framework-free by rule (see tests)."""
