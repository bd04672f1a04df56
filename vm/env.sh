# Shared settings of the VM harness (sourced). State lives under the home directory so it survives
# fresh clones: downloaded kernel package, unpacked kernel, initramfs, KVM verdict.
VM_STATE=${CSI_THIN_VM_STATE:-${CSI_THIN_CACHE:-$HOME/.cache/csi-thin}/vm}
KDIR=$VM_STATE/kernel
