// The e2e cluster's pod sandbox ("pause") image: our own few lines, built here and imported into
// containerd under the name its sandbox_image setting uses, so no registry is needed.
module csi-thin.io/tools/pause

go 1.26.0
