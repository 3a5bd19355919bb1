"""Third stage: start the follow-up agent exactly once, on this host (`local`) or as a systemd
transient unit (`systemd`), behind one interface (`launcher`)."""
