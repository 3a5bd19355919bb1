"""Everything that talks to the two llama-servers: client, router, decision engine."""
