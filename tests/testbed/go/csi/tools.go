//go:build tools

// Wrapper module: the CSI project's sanity suite (csi-sanity), which the tests run
// against the csi.sdfleet.io node plugin.
package tools

import (
	_ "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity"
)
