"""The HTTP front-end process: an OpenAI-compatible server over the coordinator (protocol/serving.py)."""
