"""The engine contract and its clients: the records and the ``EngineClient`` protocol (``protocol``), the client of
an engine in this process (``in_process``), over HTTP (``http``), and a router over several engines (``router``).
The rollout and weight sync talk to engines only through these."""
