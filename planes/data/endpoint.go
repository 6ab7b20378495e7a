package data

import (
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// Peer describes a receiver for the control plane: its host, its TCP and
// shared-memory addresses (either may be empty) and its regions. Senders
// pass it to Dialer.Dial.
func Peer(regions *Regions, tcp *Server, shm *ShmServer) *triplanev1.DataPeer {
	p := &triplanev1.DataPeer{HostId: HostID(), Regions: regions.List()}
	if tcp != nil {
		p.TcpAddr = tcp.Addr()
		p.TcpBlocksFrames = true
	}
	if shm != nil {
		p.ShmSocket = shm.Path()
	}
	return p
}
