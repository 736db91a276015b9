"""XID -> what the remediation ladder does about it, after NVIDIA's Xid catalogue.

Source: NVIDIA, "Analyzing Xid Errors with the Xid Catalog",
https://docs.nvidia.com/deploy/xid-errors/analyzing-xid-catalog.html (Ampere and newer), column
"Resolution Bucket (Immediate Action)"; the per-XID buckets as NVIDIA's NVSentinel ships them in
machine-readable form (NVIDIA/NVSentinel, distros/kubernetes/nvsentinel/charts/gpu-health-monitor/
xiderrorsmapping.csv, commit 6f8b0fcfa8e502bdda78fabf96facef729a9285b). Read 2026-12-04.

The catalogue's buckets and what the ladder makes of them (`Remedy`):

* RESET_GPU -> RESET: fence, drain, diagnose, reset, validate.
* RESTART_BM (restart bare metal) -> REBOOT: the same ladder, but one failed validation after a reset
  is enough to go to the reboot step (a reset is tried first because it costs nothing the fence has
  not already stopped, while a reboot stops every GPU of the node).
* RESTART_APP, IGNORE, CONTACT_SUPPORT / UNEXPECTED_ERR_REPORT_ISSUE, the WORKFLOW_* buckets that
  the edge cannot follow (NVLink) -> RECORD: the decision log says so; the application restarts on
  its own (its pod's restart policy), the GPU stays in service.
* WORKFLOW_XID_48 (double-bit ECC): the workflow ends in a GPU reset that applies the row remap, so
  RESET. XID 63 (a row marked for remapping) is RECORD: the pending remap itself is what the ladder
  acts on, read from NVML (`remap_pending`), so a reset is not asked twice.
* XID 154 (GPU_RECOVERY_ACTION_CHANGED) says "follow the recovery action NVML reports": RECORD here;
  the ladder acts on the other XID or on the state NVML shows (lost, remap pending).

An XID not in the table has no remedy: it is recorded, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

CATALOGUE_URL = "https://docs.nvidia.com/deploy/xid-errors/analyzing-xid-catalog.html"
CATALOGUE_READ = "2026-12-04"


class Remedy(StrEnum):
    RECORD = "record"  # nothing but a decision in the log
    RESET = "reset"  # the GPU reset ladder
    REBOOT = "reboot"  # the ladder, going to the reboot step after one failed reset
    COOL = "cool"  # heat, not an XID: fence, drain, wait until cool, validate; no reset


@dataclass(frozen=True)
class XidEntry:
    xid: int
    mnemonic: str
    bucket: str  # the catalogue's "Resolution Bucket (Immediate Action)"
    remedy: Remedy


def _entry(xid: int, mnemonic: str, bucket: str) -> XidEntry:
    remedy = {"RESET_GPU": Remedy.RESET, "RESTART_BM": Remedy.REBOOT, "WORKFLOW_XID_48": Remedy.RESET}
    return XidEntry(xid, mnemonic, bucket, remedy.get(bucket, Remedy.RECORD))


XID_CATALOGUE: dict[int, XidEntry] = {e.xid: e for e in (
    _entry(8, "ROBUST_CHANNEL_FIFO_ERROR_IDLE_TIMEOUT", "RESTART_APP"),
    _entry(13, "ROBUST_CHANNEL_GR_EXCEPTION", "RESTART_APP"),
    _entry(31, "ROBUST_CHANNEL_FIFO_ERROR_MMU_ERR_FLT", "RESTART_APP"),
    _entry(32, "ROBUST_CHANNEL_PBDMA_ERROR", "RESTART_APP"),
    _entry(43, "ROBUST_CHANNEL_RESETCHANNEL_VERIF_ERROR", "IGNORE"),
    _entry(45, "ROBUST_CHANNEL_PREEMPTIVE_REMOVAL", "WORKFLOW_XID_45"),
    _entry(46, "ROBUST_CHANNEL_GPU_TIMEOUT_ERROR", "RESET_GPU"),
    _entry(48, "ROBUST_CHANNEL_GPU_ECC_DBE", "WORKFLOW_XID_48"),
    _entry(61, "PMU_BREAKPOINT", "CONTACT_SUPPORT"),
    _entry(62, "PMU_HALT_ERROR", "RESET_GPU"),
    _entry(63, "INFOROM_DRAM_RETIREMENT_EVENT", "IGNORE"),
    _entry(64, "INFOROM_DRAM_RETIREMENT_FAILURE", "RESET_GPU"),
    _entry(68, "ROBUST_CHANNEL_NVDEC0_ERROR", "RESTART_APP"),
    _entry(69, "ROBUST_CHANNEL_GR_CLASS_ERROR", "RESTART_APP"),
    _entry(74, "NVLINK_ERROR", "WORKFLOW_NVLINK_ERR"),
    _entry(79, "ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS", "RESTART_BM"),
    _entry(92, "EXCESSIVE_SBE_INTERRUPTS", "IGNORE"),
    _entry(94, "ROBUST_CHANNEL_CONTAINED_ERROR", "RESTART_APP"),
    _entry(95, "ROBUST_CHANNEL_UNCONTAINED_ERROR", "RESET_GPU"),
    _entry(109, "ROBUST_CHANNEL_CTXSW_TIMEOUT_ERROR", "RESET_GPU"),
    _entry(110, "SEC_FAULT_ERROR", "RESET_GPU"),
    _entry(119, "GSP_RPC_TIMEOUT", "RESET_GPU"),
    _entry(120, "GSP_ERROR", "RESET_GPU"),
    _entry(121, "C2C_ERROR", "IGNORE"),
    _entry(136, "ALI_TRAINING_FAIL", "RESET_GPU"),
    _entry(140, "UNRECOVERABLE_ECC_ERROR_ESCAPE", "RESET_GPU"),
    _entry(143, "GPU_INIT_ERROR", "RESET_GPU"),
    _entry(154, "GPU_RECOVERY_ACTION_CHANGED", "FOLLOW_RECOVERY_ACTION"),
    _entry(155, "NVLINK_SW_DEFINED_ERROR", "RESET_GPU"),
    _entry(156, "RESOURCE_RETIREMENT_EVENT", "RESET_GPU"),
    _entry(158, "GPU_FATAL_TIMEOUT", "RESET_GPU"),
    _entry(160, "CHANNEL_RETIREMENT_EVENT", "RESTART_BM"),
)}


def lookup(xid: int) -> XidEntry | None:
    """The catalogue's entry for an XID; None: unknown here (recorded, no remedy)."""
    return XID_CATALOGUE.get(xid)


def remedy_for(xid: int) -> Remedy:
    entry = XID_CATALOGUE.get(xid)
    return entry.remedy if entry is not None else Remedy.RECORD
