"""Repository-wide pytest setup: tests use tiny networks, where one thread is fastest and
leaves the second core to the services (worker, PostgreSQL, Redis) the tests talk to."""

import torch

torch.set_num_threads(1)
