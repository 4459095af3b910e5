package main

// The shape of istio/istio's workload.proto and authorization.proto as istiod compiles them
// (pkg/workloadapi, pkg/workloadapi/security): one line
// per field ("Workload.waypoint 8") and per enum value ("TunnelProtocol.HBONE 1"), nested
// messages and enums named by their path, sorted. The test compares hboned's proto with it.

import (
	"fmt"
	"sort"

	"google.golang.org/protobuf/reflect/protoreflect"

	"istio.io/istio/pkg/workloadapi"
	"istio.io/istio/pkg/workloadapi/security"
)

// protoShape is the shape of "workload" or "authorization"; nil for another name.
func protoShape(which string) []string {
	switch which {
	case "workload":
		return shape(workloadapi.File_workloadapi_workload_proto)
	case "authorization":
		return shape(security.File_workloadapi_security_authorization_proto)
	}
	return nil
}

func shape(file protoreflect.FileDescriptor) []string {
	var lines []string
	var enums func(prefix string, es protoreflect.EnumDescriptors)
	enums = func(prefix string, es protoreflect.EnumDescriptors) {
		for i := 0; i < es.Len(); i++ {
			e := es.Get(i)
			for j := 0; j < e.Values().Len(); j++ {
				v := e.Values().Get(j)
				lines = append(lines, fmt.Sprintf("%s%s.%s %d", prefix, e.Name(), v.Name(), v.Number()))
			}
		}
	}
	var messages func(prefix string, ms protoreflect.MessageDescriptors)
	messages = func(prefix string, ms protoreflect.MessageDescriptors) {
		for i := 0; i < ms.Len(); i++ {
			m := ms.Get(i)
			if m.IsMapEntry() {
				continue
			}
			name := prefix + string(m.Name())
			for j := 0; j < m.Fields().Len(); j++ {
				f := m.Fields().Get(j)
				lines = append(lines, fmt.Sprintf("%s.%s %d", name, f.Name(), f.Number()))
			}
			enums(name+".", m.Enums())
			messages(name+".", m.Messages())
		}
	}
	enums("", file.Enums())
	messages("", file.Messages())
	sort.Strings(lines)
	return lines
}
