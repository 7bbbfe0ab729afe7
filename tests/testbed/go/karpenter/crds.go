//go:build tools

// Keeps the AWS provider module pinned in go.mod/go.sum: the testbed installs its real
// EC2NodeClass CRD from the module's files. This file is never compiled.
package tools

import _ "github.com/aws/karpenter-provider-aws/pkg/apis/v1"
