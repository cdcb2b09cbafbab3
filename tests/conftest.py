"""One Ray instance for the whole test session: starting Ray costs seconds on 2 cores."""
import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from cvae.localray import init_ray

    if not ray.is_initialized():
        # Logical CPUs beyond the 2 physical cores let a 2-worker trainer and a small
        # actor pool be scheduled side by side; the work itself stays small.
        init_ray(num_cpus=4, log_to_driver=False)
    yield ray
    ray.shutdown()
