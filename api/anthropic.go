package api

func (s *Server) mountAnthropic() {}
