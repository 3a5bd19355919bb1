"""The demo pipeline: a stand-in agent, the real small model it decides with (fetched and
verified), and the tiny random model the tests use."""
