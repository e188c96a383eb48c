//! Board boot methods beyond UEFI and a plain ESP: what a board's boot ROM and first-stage
//! loader need on the card, described in `firmware/<board>.yaml` and placed by these modules.

pub mod uboot_spl;
