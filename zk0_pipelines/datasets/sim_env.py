"""The SO-101 pick-and-place MuJoCo simulator (``lerobot-env-so101``) set up as one of our "labs".

A :class:`SimLab` is one data-collecting site: cube colour and size, where the cube and the target start,
lighting and the top camera's position differ between labs, so the clients are non-IID. The scene gets
two cameras named like our SO-100 schema (``top``: a fixed camera above the table; ``wrist``: on the
gripper, looking along the jaws) and a flat target marker, added with ``mujoco.MjSpec`` to the package's
own ``pick_scene.xml``.

Units (the SO-100 dataset convention, what ``observation.state`` and ``action`` hold):
the five arm joints in **degrees** (the simulator works in radians), the gripper as **0-100 % open**
(0 = the actuator's closed end of its ``ctrlrange``, 100 = fully open). ``observation.state`` is the
measured joint position; ``action`` is the position target written to the arm's ``<position>`` actuators
(what the next control step tracks). In rollouts a policy's action goes straight to those actuators
(:class:`SO101LabEnv` with ``joint_control=True``): no IK in the loop.

Offscreen rendering needs an OpenGL: ``MUJOCO_GL=egl`` (default here) or ``osmesa`` with Debian's Mesa
packages (``make system-deps``). Shadows and multisampling are turned off and llvmpipe renders on one
thread, which makes a 64x64 frame cheap on a CPU.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from zk0_pipelines.datasets.so100 import CAMERA_KEYS

os.environ.setdefault("MUJOCO_GL", "egl")
# Mesa's software rasteriser (llvmpipe) splits each frame over one thread per core; for 64x64 frames the
# hand-off costs more than it saves, most of all on a busy machine.
os.environ.setdefault("LP_NUM_THREADS", "1")

SIM_FPS = 10  # the environment's control_dt is 0.1 s
SIM_ROBOT_TYPE = "so101_follower"
ACTION_SCALE = 0.025  # metres per unit of the scripted expert's end-effector action
DEFAULT_TASK = "pick up the cube and place it on the green target"
_CAMERA_NAMES = {CAMERA_KEYS[0]: "top", CAMERA_KEYS[1]: "wrist"}
_TOP_EYE = np.array([0.5, 0.0, 0.35])
_TOP_TARGET = np.array([0.22, 0.0, 0.03])
_GOAL_GEOM = "zk0_goal_marker"
MIN_GOAL_DISTANCE = 0.08  # metres between the cube and the target at reset


@dataclass(frozen=True)
class SimLab:
    """What differs between simulated labs (all lengths in metres)."""

    cube_rgba: tuple[float, float, float, float] = (0.6, 0.3, 0.6, 1.0)
    cube_half_size: float = 0.02
    # xy box [[x_min, y_min], [x_max, y_max]] where the cube and the target are sampled
    region: tuple[tuple[float, float], tuple[float, float]] = ((0.15, -0.1), (0.3, 0.1))
    light: float = 1.0  # scale of every light's diffuse colour and of the headlight
    camera_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)  # added to the top camera's position
    rollout_steps: int = 80  # control steps (10 Hz) before a policy's rollout episode is cut

    def __post_init__(self) -> None:
        object.__setattr__(self, "cube_rgba", tuple(float(v) for v in self.cube_rgba))
        object.__setattr__(self, "region", tuple(tuple(float(v) for v in row) for row in self.region))
        object.__setattr__(self, "camera_shift", tuple(float(v) for v in self.camera_shift))
        if len(self.cube_rgba) != 4 or not all(0.0 <= v <= 1.0 for v in self.cube_rgba):
            raise ValueError(f"cube_rgba must be 4 values in [0, 1], got {self.cube_rgba}")
        if not 0.012 <= self.cube_half_size <= 0.022:
            raise ValueError(
                f"cube_half_size must be in [0.012, 0.022] m (the jaws open 40 mm), got {self.cube_half_size}"
            )
        (x0, y0), (x1, y1) = self.region
        if not (0.12 <= x0 < x1 <= 0.32 and -0.15 <= y0 < y1 <= 0.15):
            raise ValueError(
                f"region must lie in x [0.12, 0.32], y [-0.15, 0.15] (the arm's reach), got {self.region}"
            )
        if not 0.2 <= self.light <= 2.0:
            raise ValueError(f"light must be in [0.2, 2.0], got {self.light}")
        if len(self.camera_shift) != 3 or max(abs(v) for v in self.camera_shift) > 0.1:
            raise ValueError(f"camera_shift must be 3 values within ±0.1 m, got {self.camera_shift}")
        if self.rollout_steps < 2:
            raise ValueError(f"rollout_steps must be >= 2, got {self.rollout_steps}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {k: (list(map(list, v)) if k == "region" else v) for k, v in asdict(self).items()}


def _look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Quaternion of a MuJoCo camera at ``eye`` looking at ``target`` (cameras look along their -z)."""
    import mujoco

    z = eye - target
    z = z / np.linalg.norm(z)
    x = np.cross(up, z)
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, np.stack([x, y, z], axis=1).ravel())
    return quat


def _wrist_camera_pose(spec: Any) -> tuple[np.ndarray, np.ndarray]:
    """Pose, in the gripper body's frame, of a camera 6 cm behind the jaws looking along them."""
    import mujoco

    model = spec.compile()
    data = mujoco.MjData(model)
    mujoco.mj_forward(model, data)
    site = model.site("gripperframe").id
    body = model.body("gripper").id
    axes = data.site_xmat[site].reshape(3, 3)  # columns: approach (x), side (y), jaw (z)
    eye = data.site_xpos[site] - 0.06 * axes[:, 0]
    world_quat = _look_at(eye, data.site_xpos[site] + 0.06 * axes[:, 0], up=axes[:, 2])
    body_rot = data.xmat[body].reshape(3, 3)
    inverse = np.zeros(4)
    mujoco.mju_negQuat(inverse, data.xquat[body])
    local_quat = np.zeros(4)
    mujoco.mju_mulQuat(local_quat, inverse, world_quat)
    return body_rot.T @ (eye - data.xpos[body]), local_quat


def build_lab_model(lab: SimLab, xml_path: Any) -> Any:
    """The package's pick scene with this lab's cube, lights, cameras and target marker, compiled."""
    import mujoco

    spec = mujoco.MjSpec.from_file(str(xml_path))
    wrist_pos, wrist_quat = _wrist_camera_pose(spec)
    eye = _TOP_EYE + np.asarray(lab.camera_shift)
    spec.worldbody.add_camera(
        name="top", pos=eye, quat=_look_at(eye, _TOP_TARGET, np.array([0.0, 0.0, 1.0])), fovy=60
    )
    spec.body("gripper").add_camera(name="wrist", pos=wrist_pos, quat=wrist_quat, fovy=75)
    block = spec.geom("block")
    block.rgba = list(lab.cube_rgba)
    block.size = [lab.cube_half_size] * 3
    spec.body("block").pos = [0.25, 0.0, lab.cube_half_size]
    spec.worldbody.add_geom(
        name=_GOAL_GEOM,
        type=mujoco.mjtGeom.mjGEOM_CYLINDER,
        size=[0.025, 0.0005, 0.0],
        pos=[0.2, 0.08, 0.0005],
        rgba=[0.1, 0.8, 0.2, 1.0],
        contype=0,
        conaffinity=0,
    )
    for light in spec.lights:
        light.diffuse = list(np.clip(np.asarray(light.diffuse) * lab.light, 0.0, 1.0))
    spec.visual.headlight.diffuse = list(np.clip(np.asarray(spec.visual.headlight.diffuse) * lab.light, 0, 1))
    model = spec.compile()
    model.vis.quality.shadowsize = 0
    model.vis.quality.offsamples = 0
    return model


def _lab_env_class() -> type:
    """Build :class:`SO101LabEnv` lazily: importing MuJoCo is deferred until a simulator is needed."""
    import mujoco
    from lerobot_env_so101.gripper import ctrl_to_normalized, normalized_to_ctrl
    from lerobot_env_so101.mujoco_env import MujocoGymEnv
    from lerobot_env_so101.pick_env import SO101PickCubeGymEnv
    from lerobot_env_so101.pick_place_env import SO101PickPlaceGymEnv

    class _LabModel(MujocoGymEnv):
        """Swaps the loaded scene for the lab's (sits between SO101GymEnv and MujocoGymEnv in the MRO)."""

        def __init__(self, xml_path, seed=0, control_dt=0.02, physics_dt=0.002, render_spec=None, **_):
            super().__init__(xml_path=xml_path, seed=seed, control_dt=control_dt, physics_dt=physics_dt,
                             render_spec=render_spec)  # fmt: skip
            self._model = build_lab_model(self._lab, xml_path)
            self._model.vis.global_.offwidth = render_spec.width
            self._model.vis.global_.offheight = render_spec.height
            self._model.opt.timestep = physics_dt
            self._data = mujoco.MjData(self._model)

    class SO101LabEnv(SO101PickPlaceGymEnv, _LabModel):
        """SO-101 pick-and-place in one lab; ``joint_control`` takes 6 joint targets in dataset units."""

        def __init__(self, lab: SimLab, *, joint_control: bool = False, seed: int = 0):
            self._lab = lab
            self._joint_control = joint_control
            super().__init__(seed=seed, random_block_position=True, action_scale=ACTION_SCALE)
            self._goal_geom = self._model.geom(_GOAL_GEOM).id
            self._gripper_range = self._model.actuator("gripper").ctrlrange.copy()
            self._arm_ranges = self._model.actuator_ctrlrange[self._arm_ctrl_ids].copy()
            self._gripper_qpos = self._model.joint("gripper").qposadr[0]
            self._arm_qpos = np.asarray([self._model.joint(i).qposadr[0] for i in self._arm_dof_ids])

        @property
        def lab(self) -> SimLab:
            return self._lab

        def reset(self, seed=None, **kwargs):
            """Arm home, cube and target sampled in the lab's region from ``seed``."""
            super(SO101PickCubeGymEnv, self).reset(seed=seed)
            mujoco.mj_resetData(self._model, self._data)
            self.reset_robot()
            bounds = np.asarray(self._lab.region)
            block_xy = self.np_random.uniform(*bounds)
            goal_xy = self.np_random.uniform(*bounds)
            for _ in range(100):
                if np.linalg.norm(goal_xy - block_xy) >= MIN_GOAL_DISTANCE:
                    break
                goal_xy = self.np_random.uniform(*bounds)
            self._data.jnt("block").qpos[:3] = (*block_xy, self._block_z)
            self._data.jnt("block").qpos[3:] = (1.0, 0.0, 0.0, 0.0)
            self._goal_pos = np.asarray([*goal_xy, self._block_z])
            self._model.geom_pos[self._goal_geom][:2] = goal_xy
            mujoco.mj_forward(self._model, self._data)
            self._z_init = self._data.sensor("block_pos").data[2]
            self._was_carried = False
            return self._compute_observation(), {}

        def apply_action(self, action: np.ndarray) -> None:
            if not self._joint_control:
                super().apply_action(action)
                return
            self._data.ctrl[self._arm_ctrl_ids] = self.targets_to_ctrl(np.asarray(action, dtype=np.float64))
            self._data.ctrl[self._gripper_ctrl_id] = normalized_to_ctrl(
                float(action[5]) / 100.0, self._gripper_range
            )
            for _ in range(self._n_substeps):
                mujoco.mj_step(self._model, self._data)

        def targets_to_ctrl(self, action: np.ndarray) -> np.ndarray:
            """Arm joint targets in degrees → actuator ctrl in radians, clipped to the ctrl ranges."""
            radians = np.deg2rad(action[:5])
            return np.clip(radians, self._arm_ranges[:, 0], self._arm_ranges[:, 1])

        def joint_state(self) -> np.ndarray:
            """Measured joints (6,) in dataset units: degrees, gripper 0-100 % open."""
            arm = np.rad2deg(self._data.qpos[self._arm_qpos])
            grip = 100.0 * ctrl_to_normalized(self._data.qpos[self._gripper_qpos], self._gripper_range)
            return np.asarray([*arm, grip], dtype=np.float32)

        def joint_targets(self) -> np.ndarray:
            """Current actuator targets (6,) in dataset units (what the last step commanded)."""
            arm = np.rad2deg(self._data.ctrl[self._arm_ctrl_ids])
            grip = 100.0 * ctrl_to_normalized(self._data.ctrl[self._gripper_ctrl_id], self._gripper_range)
            return np.asarray([*arm, grip], dtype=np.float32)

        def block_pos(self) -> np.ndarray:
            return self._data.sensor("block_pos").data.copy()

    return SO101LabEnv


_ENV_CLASS: type | None = None


def make_lab_env(lab: SimLab, *, joint_control: bool = False, seed: int = 0) -> Any:
    """A :class:`SO101LabEnv` for ``lab`` (state-only; render with :class:`LabCameras`)."""
    global _ENV_CLASS
    if _ENV_CLASS is None:
        _ENV_CLASS = _lab_env_class()
    return _ENV_CLASS(lab, joint_control=joint_control, seed=seed)


@dataclass
class LabCameras:
    """Offscreen renders of the ``top`` and ``wrist`` cameras as HWC uint8, keyed by dataset feature."""

    env: Any
    image_hw: tuple[int, int] = (64, 64)
    _renderer: Any = field(default=None, repr=False)

    def render(self) -> dict[str, np.ndarray]:
        import mujoco

        if self._renderer is None:
            self._renderer = mujoco.Renderer(self.env.model, height=self.image_hw[0], width=self.image_hw[1])
        frames = {}
        for key, camera in _CAMERA_NAMES.items():
            self._renderer.update_scene(self.env.data, camera=camera)
            frames[key] = self._renderer.render().copy()
        return frames

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


def simulator_unavailable() -> str | None:
    """Why the simulator cannot render here (missing package or OpenGL), or None when it can."""
    try:
        import lerobot_env_so101  # noqa: F401
        import mujoco
    except ImportError as exc:
        return f"the simulator is not installed ({exc}); run `make install`"
    except Exception as exc:  # noqa: BLE001 - mujoco picks its GL backend at import (MUJOCO_GL)
        return (
            f"MuJoCo cannot load its OpenGL backend MUJOCO_GL={os.environ.get('MUJOCO_GL', '')!r} "
            f"({type(exc).__name__}: {exc}); install Mesa with `make system-deps`"
        )
    try:
        model = mujoco.MjModel.from_xml_string("<mujoco><worldbody><light/></worldbody></mujoco>")
        renderer = mujoco.Renderer(model, 8, 8)
        renderer.render()
        renderer.close()
    except Exception as exc:  # noqa: BLE001 - any GL failure means "cannot render"
        gl = os.environ.get("MUJOCO_GL", "")
        return (
            f"MuJoCo cannot render offscreen with MUJOCO_GL={gl!r} ({type(exc).__name__}: {exc}); "
            "install Mesa with `make system-deps`"
        )
    return None
