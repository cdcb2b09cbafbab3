"""One Ray instance for the whole test session: starting Ray costs seconds on 2 cores."""
import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from cvae.localray import init_ray

    if ray.is_initialized() and ray.cluster_resources().get("CPU", 0) < 4:
        ray.shutdown()  # a job's own local Ray, left by an earlier test: too small for the pools here
    if not ray.is_initialized():
        # Logical CPUs beyond the 2 physical cores let a 2-worker trainer and a small
        # actor pool be scheduled side by side; the work itself stays small.
        init_ray(num_cpus=4, log_to_driver=False)
    yield ray
    ray.shutdown()
