"""Simulation of the world the clients live in: the simulated clock and everything that runs on it.

- ``clock``: device profiles' durations, round policies (``wait_all``, ``deadline``, ``over_select``) and the
  ``RoundClock`` the aggregator actor is handed once, at its start;
- ``profiles``: the run's device profiles (seeded, from a table or a FedScale trace) and their record in the
  run directory;
- ``fedscale``: FedScale's device-capacity and client-behaviour traces;
- ``availability``: who is online when a round samples (seeded, or a behaviour trace) and over-selection;
- ``buffering``: asynchronous buffered aggregation (FedBuff): which arrivals form a server step, and the
  staleness discount.

The modules are imported by name (nothing is re-exported here), so unpickling a ``RoundClock`` in the
aggregator's process imports ``clock`` alone.
"""
