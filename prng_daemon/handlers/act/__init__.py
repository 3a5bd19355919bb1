"""Third stage: start the follow-up agent exactly once, on this host (`local`), as a systemd
transient unit (`systemd`) or as a Slurm job (`slurm`, per agent), behind one interface
(`launcher`)."""
