"""Classification heads on the frozen model: trained from labelled JSONL, answered from the
hidden states of one prefill pass (docs/heads.md)."""
