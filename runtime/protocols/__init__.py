"""Two-party protocols over additive shares in Z_(2^64), written as generators (see messages.py).

Every protocol runs unchanged as P0, P1, the dealer (meta tensors) and the simulator.
Each module declares the cost of its protocols (`*_cost` functions returning `Cost`);
tests check them against what the transport counted.
"""
